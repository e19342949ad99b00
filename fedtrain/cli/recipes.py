"""``fedtrain train``, ``fedtrain eval``, ``fedtrain plot`` and ``fedtrain recipes``: running recipes in a
workdir (logs, checkpoints, results) and reading the workdir back."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fedtrain.cli.config import apply_overrides, load_recipe_module, recipe_config, recipe_dirs, resolve_recipe
from fedtrain.logs.runs import RUN_RECORD as RUN_FILE
from fedtrain.logs.runs import read_run_record, write_atomic, write_run_record

# Keys of a recipe config by what changing them means for a workdir that already holds rounds.
IDENTITY_KEYS = ("task", "algorithm", "model", "data", "seed")  # another experiment: never resumed
RUN_LENGTH_KEYS = ("rounds", "checkpoint_every", "validation_freq", "validation_batch_size")
# Run-length keys say how long the run goes and how often it is checkpointed and evaluated; they do not
# change what a round computes, so they may change on resume. Every other key (learning rates, batch size,
# clients per round, local epochs or steps, backend...) is an experiment key: resuming with a different
# value needs --allow-config-change.
_MISSING = object()


def _abs(path) -> Path:
    """Every path from the command line is made absolute before anything uses it (orbax needs that)."""
    return Path(os.path.abspath(os.fspath(path)))


def _read_run(workdir) -> dict | None:
    return read_run_record(workdir)


class WorkdirError(ValueError):
    """A --workdir that cannot be used (a file, not writable): one line naming the path and what to do."""


def _writable_dir(path: Path) -> Path:
    """The nearest existing directory at or above ``path`` (where ``path`` would be created)."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def _check_workdir(workdir: Path, command: str) -> None:
    """Refuses, before any work, a workdir that is a file or (for ``train``) cannot be written."""
    if workdir.exists() and not workdir.is_dir():
        if command == "train":
            raise WorkdirError(f"--workdir {workdir} is a file, not a directory; `fedtrain train` keeps its logs and "
                               "checkpoints in a directory: pass another --workdir (a new directory is created).")
        raise WorkdirError(f"{workdir} is a file, not a `fedtrain train` workdir; pass the directory that was "
                           f"given to `fedtrain train --workdir` (`fedtrain {command} DIR`).")
    if command != "train":
        return
    probe = _writable_dir(workdir)
    if not probe.is_dir():
        raise WorkdirError(f"--workdir {workdir} cannot be created: {probe} is a file, not a directory; pass "
                           "another --workdir.")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "the workdir" if probe == workdir else f"the directory that would hold --workdir {workdir}"
        raise WorkdirError(f"{probe} ({what}) is not writable, so `fedtrain train` cannot write its logs and "
                           f"checkpoints there; make it writable (chmod u+w {probe}) or pass another --workdir.")


def _resume_command(args: argparse.Namespace) -> str:
    """The command line that reruns this ``fedtrain train`` (and so resumes it)."""
    import shlex
    import sys

    argv = getattr(args, "argv", None) or sys.argv[1:]
    prog = "fedtrain" if os.path.basename(sys.argv[0] or "") == "fedtrain" else "python -m fedtrain"
    return f"{prog} {shlex.join(argv)}"


def _interrupted(args: argparse.Namespace, ckpt: Path, err: KeyboardInterrupt) -> int:
    """One line for Ctrl-C / SIGTERM: the newest checkpoint and the command that resumes from it."""
    import signal
    import sys

    from fedtrain.checkpoint_format import latest_step

    signum = int(getattr(err, "signum", signal.SIGINT))
    try:
        last = latest_step(ckpt) if ckpt.is_dir() else None
    except Exception:  # noqa: BLE001 - the hint must not fail
        last = None
    saved = (f"the newest checkpoint is round {last} in {ckpt}" if last is not None
             else f"no checkpoint was saved yet in {ckpt}")
    print(f"fedtrain: stopped by {signal.Signals(signum).name}; {saved}; rerun to resume: "
          f"{_resume_command(args)}", file=sys.stderr, flush=True)
    return 128 + signum


def _check_same_recipe(run: dict, recipe: str, variant: str | None, config: dict, workdir) -> None:
    if (run["recipe"], run.get("variant")) != (recipe, variant):
        raise ValueError(
            f"{workdir} holds a run of recipe {run['recipe']}{':' + run['variant'] if run.get('variant') else ''}, "
            f"not {recipe}{':' + variant if variant else ''}; refusing to resume it. "
            "Use another --workdir (or delete this one to start over).")
    for key in IDENTITY_KEYS:
        if run["config"].get(key) != config.get(key):
            raise ValueError(f"{workdir} was trained with config.{key}={run['config'].get(key)!r}, this run has "
                             f"{config.get(key)!r}; refusing to resume it (task, algorithm, model, data and seed "
                             "never change within a workdir, not even with --allow-config-change). "
                             "Use another --workdir.")


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """``{dotted key: (old, new)}`` for every key whose value differs (``_MISSING`` where a key is absent)."""
    a, b = _flatten(old), _flatten(new)
    return {k: (a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(a.keys() | b.keys())
            if a.get(k, _MISSING) != b.get(k, _MISSING)}


def _show(value) -> str:
    return "(not set)" if value is _MISSING else repr(value)


def _format_changes(changes: dict) -> str:
    return "\n".join(f"  config.{k}: {_show(old)} -> {_show(new)}" for k, (old, new) in changes.items())


def _segments(run: dict) -> list[dict]:
    """The run record's segments; a record written before segments existed is one segment from round 0."""
    if run.get("segments"):
        return [dict(s) for s in run["segments"]]
    return [{"start_round": 0, "config": run["config"], "started": None}]


def _default(o):
    return o.tolist() if hasattr(o, "tolist") else str(o)


def cmd_train(args: argparse.Namespace) -> int:
    workdir = _abs(args.workdir)
    _check_workdir(workdir, "train")
    try:
        return _train(args)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM during fit (fedtrain.trainer.TrainingInterrupted)
        return _interrupted(args, workdir / "checkpoints", err)


def _train(args: argparse.Namespace) -> int:
    import datetime

    from fedtrain import __version__
    from fedtrain import callbacks as cb
    from fedtrain import experiment
    from fedtrain.checkpoint_format import latest_step

    path, variant = resolve_recipe(args.recipe)
    recipe = _abs(path).stem
    config = apply_overrides(recipe_config(path, variant), args.overrides)
    workdir = _abs(args.workdir)
    ckpt = workdir / "checkpoints"
    config_dict = json.loads(json.dumps(config.to_dict(), default=_default))
    run = _read_run(workdir)
    start = latest_step(ckpt)
    resuming = start is not None
    segments, changes = [], {}
    if run is not None and resuming:
        _check_same_recipe(run, recipe, variant, config_dict, workdir)
        segments = _segments(run)
        changes = config_changes(segments[-1]["config"], config_dict)
        experiment_changes = {k: v for k, v in changes.items() if k.split(".")[0] not in RUN_LENGTH_KEYS}
        if experiment_changes and not args.allow_config_change:
            raise ValueError(
                f"{workdir} holds {start} rounds trained with another config; refusing to resume it with "
                f"changed hyperparameters (old -> new):\n{_format_changes(experiment_changes)}\n"
                f"Rerun with --allow-config-change to continue from round {start} with the new values (the run "
                f"record {RUN_FILE} keeps the config of every segment), or use another --workdir. Run-length "
                f"keys ({', '.join('config.' + k for k in RUN_LENGTH_KEYS)}) may change without the flag.")
    elif resuming:
        raise ValueError(f"{ckpt} has checkpoints but {workdir / RUN_FILE} is missing, so the recipe that wrote "
                         "them is unknown; refusing to resume. Use another --workdir.")
    exp = experiment.build(config)
    workdir.mkdir(parents=True, exist_ok=True)
    if not segments or changes:  # a new segment starts whenever the config differs from the last one's
        segment = {"start_round": int(start or 0), "config": config_dict,
                   "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "fedtrain_version": __version__}
        if changes:
            segment["changes"] = {k: [None if o is _MISSING else o, None if n is _MISSING else n]
                                  for k, (o, n) in changes.items()}
        segments.append(segment)
    record = {"recipe": recipe, "variant": variant, "recipe_path": path, "config": config_dict,
              "segments": segments}
    write_run_record(workdir, record, default=_default)
    trainer = exp.trainer()
    if resuming:
        print(f"resuming {recipe} from {ckpt} (round {start})", flush=True)
        if changes:
            print(f"config changed from round {start} (old -> new):\n{_format_changes(changes)}", flush=True)
    callbacks = [*exp.callbacks,
                 cb.CSVLogger(workdir / "metrics.csv", append=True),
                 cb.TensorBoard(workdir / "tensorboard"),
                 cb.OrbaxCheckpoint(ckpt, every_rounds=int(config.get("checkpoint_every", 10) or 10),
                                    async_save=False,
                                    on_unreadable="restart" if getattr(args, "restart_if_unreadable", False)
                                    else "error")]
    verbose = {"auto": "auto", "bar": 1, "line": 2, "none": 0}[args.progress]
    trainer.fit(exp.train_data, **exp.fit_kwargs, validation_data=exp.test_data, callbacks=callbacks,
                verbose=verbose)
    results = trainer.evaluate(exp.test_data, batch_size=exp.fit_kwargs["validation_batch_size"],
                               callbacks=[cb.ProgressBar(1)] if verbose else None)
    out = {"recipe": recipe, "variant": variant, "rounds": trainer.round, "test": results,
           "expected_accuracy": config.get("expected_accuracy")}
    write_atomic(workdir / "results.json", json.dumps(out, indent=2))
    print(f"{recipe}: {trainer.round} rounds; test " + " - ".join(f"{k}: {v:.4f}" for k, v in results.items()))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import ml_collections

    from fedtrain import experiment

    workdir = _abs(args.workdir)
    _check_workdir(workdir, "eval")
    run = _read_run(workdir)
    if run is None:
        raise FileNotFoundError(f"{workdir / RUN_FILE} not found; is {workdir} a `fedtrain train` workdir?")
    config = ml_collections.ConfigDict(run["config"])
    exp = experiment.build(config)
    trainer = exp.trainer()
    rounds = trainer.restore(workdir / "checkpoints")
    from fedtrain.callbacks import ProgressBar

    results = trainer.evaluate(exp.test_data, batch_size=exp.fit_kwargs["validation_batch_size"],
                               callbacks=[ProgressBar(1, file=sys.stderr)])  # stdout stays the result (--json)
    if args.json:
        print(json.dumps({"recipe": run["recipe"], "round": rounds, **results}))
    else:
        print(f"{run['recipe']} at round {rounds}: " + " - ".join(f"{k}: {v:.4f}" for k, v in results.items()))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from fedtrain.logs.plots import plot_run

    workdir = _abs(args.workdir)
    if not (workdir.is_file() and workdir.suffix in (".csv", ".jsonl")):  # a log file may be plotted directly
        _check_workdir(workdir, "plot")
    out = _abs(args.output) if args.output is not None else (
        (workdir if workdir.is_dir() else workdir.parent) / "curves.png")
    probe = _writable_dir(out.parent)
    if probe.exists() and not probe.is_dir():
        raise WorkdirError(f"{probe} is a file, so `fedtrain plot` cannot write {out}; pass -o FILE in a "
                           "directory.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise WorkdirError(f"{probe} is not writable, so `fedtrain plot` cannot write {out}; make it writable "
                           f"(chmod u+w {probe}) or pass -o FILE in a writable directory.")
    print(plot_run(workdir, out, distribution=args.distribution))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    dirs = recipe_dirs()
    if not dirs:
        raise FileNotFoundError("no recipes/ folder here or next to the fedtrain package.")
    seen = set()
    for d in dirs:
        for f in sorted(d.glob("[a-z]*.py")):
            if f.stem in seen:
                continue
            seen.add(f.stem)
            doc = load_recipe_module(str(f)).__doc__ or ""
            first = doc.strip().splitlines()[0] if doc.strip() else ""
            variants = doc.split("Variants:")[1].split("(")[0].split("\n")[0].strip(" .") if "Variants:" in doc else ""
            print(f"{f.stem:28s} {first}" + (f"  [{variants}]" if args.verbose and variants else ""))
    return 0


def add_recipe_commands(groups) -> None:
    p = groups.add_parser("train", help="run a recipe: progress, TensorBoard, CSV and checkpoints in a workdir",
                          description="Run RECIPE (a recipe file, PATH:VARIANT, or a name in ./recipes). Logs "
                          "metrics.csv, tensorboard/ and checkpoints/ in --workdir and resumes from them when "
                          "rerun. Override any config key with --config.KEY=VALUE (e.g. --config.rounds=2). "
                          "On resume, the run-length keys (" + ", ".join(RUN_LENGTH_KEYS) + ") may change: "
                          "--config.rounds=N with a larger N trains longer. Any other key is an experiment key: "
                          "a changed value is refused, with the differing keys shown, unless "
                          "--allow-config-change is given; task, algorithm, model, data and seed never change "
                          f"within a workdir. {RUN_FILE} in the workdir keeps one segment per config (start "
                          "round, config, time), never overwritten.")
    p.add_argument("recipe", help="recipe name or path, optionally :variant (e.g. shakespeare_fedavg:demo)")
    p.add_argument("--workdir", required=True, help="directory for logs, checkpoints and results")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though experiment keys (e.g. client_learning_rate, batch_size, "
                   "clients_per_round) differ from the workdir's config; the new values apply from the newest "
                   f"checkpoint's round on, and {RUN_FILE} records them as a new segment")
    p.add_argument("--restart-if-unreadable", action="store_true",
                   help="when every checkpoint in the workdir is damaged, set them aside as <step>.corrupt and "
                   "train from round 0 (without it, training stops with an error naming the steps tried)")
    p.add_argument("--progress", choices=["auto", "bar", "line", "none"], default="auto",
                   help="progress display (default: a bar on a terminal, lines otherwise)")
    p.set_defaults(handler=cmd_train)

    p = groups.add_parser("eval", help="evaluate the newest checkpoint of a workdir on the test data",
                          description="Restore the newest checkpoint of a `fedtrain train` workdir and "
                          "evaluate it on the recipe's test data.")
    p.add_argument("workdir")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_eval)

    p = groups.add_parser("plot", help="plot a workdir's learning curves to PNG",
                          description="Write the learning curves of a workdir (metrics.csv) to a PNG, one panel "
                          "per metric, x = round (0-indexed, as in metrics.csv and TensorBoard), titled with the "
                          "recipe of the workdir's run record.")
    p.add_argument("workdir")
    p.add_argument("-o", "--output", help="PNG to write (default: WORKDIR/curves.png)")
    p.add_argument("--distribution", action="store_true",
                   help="draw the p10-p90 band and median over clients of each metric validated per client "
                        "(fit(validation_per_client=True))")
    p.set_defaults(handler=cmd_plot)

    p = groups.add_parser("recipes", help="list the recipes in ./recipes",
                          description="List the recipes in ./recipes (and the ones shipped with the source tree).")
    p.add_argument("-v", "--verbose", action="store_true", help="also list each recipe's variants")
    p.set_defaults(handler=cmd_recipes)
