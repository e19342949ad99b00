"""``fedtrain train``, ``fedtrain eval``, ``fedtrain plot`` and ``fedtrain recipes``: running recipes in a
workdir (logs, checkpoints, results) and reading the workdir back."""

from __future__ import annotations

import argparse
import json

from fedtrain.cli.config import apply_overrides, load_recipe_module, recipe_config, recipe_dirs, resolve_recipe

RUN_FILE = "fedtrain_run.json"


def _read_run(workdir) -> dict | None:
    from pathlib import Path

    f = Path(workdir) / RUN_FILE
    return json.loads(f.read_text()) if f.exists() else None


def _check_same_recipe(run: dict, recipe: str, variant: str | None, config: dict, workdir) -> None:
    if (run["recipe"], run.get("variant")) != (recipe, variant):
        raise ValueError(
            f"{workdir} holds a run of recipe {run['recipe']}{':' + run['variant'] if run.get('variant') else ''}, "
            f"not {recipe}{':' + variant if variant else ''}; refusing to resume it. "
            "Use another --workdir (or delete this one to start over).")
    for key in ("task", "algorithm", "model", "data", "seed"):
        if run["config"].get(key) != config.get(key):
            raise ValueError(f"{workdir} was trained with config.{key}={run['config'].get(key)!r}, this run has "
                             f"{config.get(key)!r}; refusing to resume it. Use another --workdir.")


def _default(o):
    return o.tolist() if hasattr(o, "tolist") else str(o)


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedtrain import callbacks as cb
    from fedtrain import experiment
    from fedtrain.checkpoint_format import latest_step

    path, variant = resolve_recipe(args.recipe)
    recipe = Path(path).stem
    config = apply_overrides(recipe_config(path, variant), args.overrides)
    workdir = Path(args.workdir)
    ckpt = workdir / "checkpoints"
    config_dict = json.loads(json.dumps(config.to_dict(), default=_default))
    run = _read_run(workdir)
    resuming = ckpt.is_dir() and latest_step(ckpt) is not None
    if run is not None and resuming:
        _check_same_recipe(run, recipe, variant, config_dict, workdir)
    elif resuming:
        raise ValueError(f"{ckpt} has checkpoints but {workdir / RUN_FILE} is missing, so the recipe that wrote "
                         "them is unknown; refusing to resume. Use another --workdir.")
    exp = experiment.build(config)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RUN_FILE).write_text(json.dumps(
        {"recipe": recipe, "variant": variant, "recipe_path": path, "config": config_dict}, indent=2,
        default=_default))
    trainer = exp.trainer()
    if resuming:
        print(f"resuming {recipe} from {ckpt} (round {latest_step(ckpt)})", flush=True)
    callbacks = [*exp.callbacks,
                 cb.CSVLogger(workdir / "metrics.csv", append=True),
                 cb.TensorBoard(workdir / "tensorboard"),
                 cb.OrbaxCheckpoint(ckpt, every_rounds=int(config.get("checkpoint_every", 10) or 10),
                                    async_save=False)]
    verbose = {"auto": "auto", "bar": 1, "line": 2, "none": 0}[args.progress]
    trainer.fit(exp.train_data, **exp.fit_kwargs, validation_data=exp.test_data, callbacks=callbacks,
                verbose=verbose)
    results = trainer.evaluate(exp.test_data, batch_size=exp.fit_kwargs["validation_batch_size"])
    out = {"recipe": recipe, "variant": variant, "rounds": trainer.round, "test": results,
           "expected_accuracy": config.get("expected_accuracy")}
    (workdir / "results.json").write_text(json.dumps(out, indent=2))
    print(f"{recipe}: {trainer.round} rounds; test " + " - ".join(f"{k}: {v:.4f}" for k, v in results.items()))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    import ml_collections

    from fedtrain import experiment

    workdir = Path(args.workdir)
    run = _read_run(workdir)
    if run is None:
        raise FileNotFoundError(f"{workdir / RUN_FILE} not found; is {workdir} a `fedtrain train` workdir?")
    config = ml_collections.ConfigDict(run["config"])
    exp = experiment.build(config)
    trainer = exp.trainer()
    rounds = trainer.restore(workdir / "checkpoints")
    results = trainer.evaluate(exp.test_data, batch_size=exp.fit_kwargs["validation_batch_size"])
    if args.json:
        print(json.dumps({"recipe": run["recipe"], "round": rounds, **results}))
    else:
        print(f"{run['recipe']} at round {rounds}: " + " - ".join(f"{k}: {v:.4f}" for k, v in results.items()))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from fedtrain.logs.plots import plot_run

    print(plot_run(args.workdir, args.output))
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
                          "rerun. Override any config key with --config.KEY=VALUE (e.g. --config.rounds=2).")
    p.add_argument("recipe", help="recipe name or path, optionally :variant (e.g. shakespeare_fedavg:demo)")
    p.add_argument("--workdir", required=True, help="directory for logs, checkpoints and results")
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
                          description="Write the learning curves of a workdir (metrics.csv) to a PNG.")
    p.add_argument("workdir")
    p.add_argument("-o", "--output", help="PNG to write (default: WORKDIR/curves.png)")
    p.set_defaults(handler=cmd_plot)

    p = groups.add_parser("recipes", help="list the recipes in ./recipes",
                          description="List the recipes in ./recipes (and the ones shipped with the source tree).")
    p.add_argument("-v", "--verbose", action="store_true", help="also list each recipe's variants")
    p.set_defaults(handler=cmd_recipes)
