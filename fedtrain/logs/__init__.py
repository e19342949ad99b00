"""Reading a run's logs back, and its learning curves as PNG.

- ``fedtrain.logs.events``: TensorBoard event files (``read_scalars``, ``read_histograms``, ``read_events``);
- ``fedtrain.logs.runs``: a run's curves from its CSV, JSON-lines or event files (``load_run``);
- ``fedtrain.logs.plots``: learning-curve figures (``plot_curves``, ``plot_run``); needs matplotlib,
  the ``plots`` extra, which is imported only when a figure is drawn.

This package imports nothing from ``fedtrain.callbacks``; the callbacks write the logs it reads.
"""

from fedtrain.logs.events import event_files, read_events, read_histograms, read_scalars
from fedtrain.logs.plots import curve_groups, plot_curves, plot_run
from fedtrain.logs.runs import load_run

__all__ = ["curve_groups", "event_files", "load_run", "plot_curves", "plot_run", "read_events", "read_histograms",
           "read_scalars"]
