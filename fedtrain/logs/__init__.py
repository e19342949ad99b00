"""Reading a run's logs back, and its learning curves as PNG.

- ``fedtrain.logs.events``: TensorBoard event files (``read_scalars``, ``read_histograms``, ``read_events``);
- ``fedtrain.logs.runs``: a run's curves from its CSV, JSON-lines or event files (``load_run``), and the
  run record of a ``fedtrain train`` workdir (``read_run_record``);
- ``fedtrain.logs.plots``: learning-curve figures (``plot_curves``, ``run_figure``, ``plot_run``); needs matplotlib,
  the ``plots`` extra, which is imported only when a figure is drawn.

Rounds are 0-indexed in every log (the CSV's ``round``, the TensorBoard step, ``History.rounds``).
This package imports nothing from ``fedtrain.callbacks``; the callbacks write the logs it reads.
"""

from fedtrain.logs.events import event_files, read_events, read_histograms, read_scalars
from fedtrain.logs.plots import curve_groups, plot_curves, plot_run, run_figure
from fedtrain.logs.runs import RUN_RECORD, load_run, read_run_record, run_label

__all__ = ["RUN_RECORD", "curve_groups", "event_files", "load_run", "plot_curves", "plot_run", "read_events",
           "read_histograms", "read_run_record", "read_scalars", "run_figure", "run_label"]
