"""The ``fedtrain`` command line: ``fedtrain {train,eval,plot,recipes}`` and ``fedtrain data {inspect,convert,partition}``.

Each subcommand is a function ``cmd_<group>_<name>(args) -> int`` registered in
``build_parser``; add a command by adding a parser and its handler.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from fedtrain.data.convert import describe, detect_format, open_store

    data = open_store(args.path, split=args.split)
    info = describe(data)
    sizes = info.pop("sizes")
    info = {"path": args.path, "format": detect_format(args.path), **info}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(f"{args.path} ({info['format']})")
        print(f"  clients:  {info['num_clients']:,}")
        print(f"  examples: {info['num_examples']:,}")
        if info["size_quantiles"]:
            print("  client size quantiles: " + "  ".join(f"p{q}={v:g}" for q, v in info["size_quantiles"].items()))
        for name, f in info["features"].items():
            print(f"  feature {name}: shape [N{''.join(', ' + str(d) for d in f['shape'])}] dtype {f['dtype']}")
    if args.histogram:
        from fedtrain.callbacks.plots import _matplotlib

        Figure, FigureCanvasAgg = _matplotlib()  # a clear error naming fedtrain[plots] if missing
        fig = Figure(figsize=(6, 3.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.hist(sizes, bins=min(50, max(1, len(np.unique(sizes)))))
        ax.set_xlabel("examples per client")
        ax.set_ylabel("clients")
        ax.set_title(f"{info['num_clients']:,} clients, {info['num_examples']:,} examples")
        fig.tight_layout()
        fig.savefig(args.histogram, dpi=100)
        print(f"  histogram written to {args.histogram}")
    if hasattr(data, "close"):
        data.close()
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from fedtrain.data.convert import convert, describe, open_store

    out = convert(args.input, args.output, args.format, split=args.split, overwrite=args.overwrite)
    info = describe(open_store(out, split=args.split if args.format == "tff-sqlite" else None))
    print(f"wrote {out}: {info['num_clients']:,} clients, {info['num_examples']:,} examples")
    return 0


def cmd_data_partition(args: argparse.Namespace) -> int:
    from fedtrain.data import partitioners
    from fedtrain.data.convert import write_store

    with np.load(args.input, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    labels = arrays.get(args.label_key)
    n = len(next(iter(arrays.values())))
    if args.method in ("dirichlet", "shards") and labels is None:
        raise ValueError(f"{args.input} has no array {args.label_key!r} (has {sorted(arrays)}); pass --label-key.")
    if args.method == "iid":
        part = partitioners.iid(n, args.num_clients, seed=args.seed)
    elif args.method == "dirichlet":
        part = partitioners.dirichlet(labels, args.num_clients, args.alpha, seed=args.seed)
    elif args.method == "shards":
        part = partitioners.shards(labels, args.num_clients, args.shards_per_client, seed=args.seed)
    elif args.method == "by_key":
        if args.key not in arrays:
            raise ValueError(f"{args.input} has no array {args.key!r} (has {sorted(arrays)}); pass --key.")
        part = partitioners.by_key(arrays.pop(args.key))
    else:
        part = partitioners.sized(n, args.num_clients, args.distribution, seed=args.seed)
    write_store(part.apply(arrays), args.output, args.format, overwrite=args.overwrite)
    print(part.format_summary(labels))
    print(f"wrote {args.output}")
    return 0


# ---------------------------------------------------------------------- recipes: train / eval / plot / list
RUN_FILE = "fedtrain_run.json"


def _recipe_dirs() -> list:
    from pathlib import Path

    here = Path.cwd() / "recipes"
    repo = Path(__file__).resolve().parent.parent / "recipes"
    return [d for d in dict.fromkeys([here, repo]) if d.is_dir()]


def resolve_recipe(spec: str) -> tuple[str, str | None]:
    """``(path, variant)`` of ``PATH[:VARIANT]`` or ``NAME[:VARIANT]`` (a file in ./recipes)."""
    import difflib
    from pathlib import Path

    path, variant = spec, None
    if ":" in spec and not Path(spec).exists():
        path, variant = spec.rsplit(":", 1)
    p = Path(path)
    if p.suffix == ".py" or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist.")
        return str(p.resolve()), variant
    names = {}
    for d in _recipe_dirs():
        for f in sorted(d.glob("[a-z]*.py")):
            names.setdefault(f.stem, f)
    if path in names:
        return str(names[path].resolve()), variant
    close = difflib.get_close_matches(path, list(names), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown recipe {path!r}.{hint} Run `fedtrain recipes` to list them, or pass a path.")


def load_recipe_module(path: str):
    """Imports a recipe file; a file inside a package folder (``recipes/``) imports as ``recipes.<name>``."""
    import importlib
    import importlib.util
    from pathlib import Path

    p = Path(path)
    if (p.parent / "__init__.py").exists():
        root = str(p.parent.parent)
        if root not in sys.path:
            sys.path.insert(0, root)
        return importlib.import_module(f"{p.parent.name}.{p.stem}")
    spec = importlib.util.spec_from_file_location(f"fedtrain_recipe_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_config(path: str, variant: str | None):
    module = load_recipe_module(path)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config(); a recipe defines get_config(variant='paper').")
    return module.get_config(variant) if variant else module.get_config()


def _config_keys(config, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if hasattr(v, "items"):
            keys += _config_keys(v, f"{prefix}{k}.")
    return keys


def _parse_value(text: str, current):
    import ast

    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if text.lower() in ("none", "null"):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, str) and not isinstance(value, str):
        value = text
    if isinstance(value, list):
        value = tuple(value)
    return value


def apply_overrides(config, overrides: list[str]):
    """Sets ``--config.a.b=value`` overrides (``value`` as a Python literal) on ``config``."""
    import difflib

    import ml_collections

    pending = list(overrides)
    while pending:
        item = pending.pop(0)
        if not item.startswith("--config."):
            raise ValueError(f"unrecognized argument {item!r}; overrides look like --config.rounds=10.")
        key, eq, text = item[len("--config."):].partition("=")
        if not eq:
            if not pending or pending[0].startswith("--"):
                raise ValueError(f"--config.{key} needs a value: --config.{key}=VALUE.")
            text = pending.pop(0)
        *parents, leaf = key.split(".")
        node = config
        for i, part in enumerate(parents + [leaf]):
            is_leaf = i == len(parents)
            if not hasattr(node, "keys") or part not in node.keys():
                options = _config_keys(config)
                close = difflib.get_close_matches(key, options, n=3, cutoff=0.6)
                hint = f" Did you mean {', '.join('config.' + c for c in close)}?" if close else ""
                raise ValueError(f"unknown config key 'config.{key}'.{hint}")
            if not is_leaf:
                node = node[part]
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ValueError(f"config.{key} is a group; set one of its keys, e.g. "
                             f"--config.{key}.{next(iter(current.keys()), 'key')}=...")
        try:
            value = _parse_value(text, current)
            node[leaf] = value
        except (TypeError, ValueError) as err:
            raise ValueError(f"cannot set config.{key}={text!r}: {err}") from None
    return config


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
    from fedtrain.callbacks.checkpoint import latest_step

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
    from fedtrain.callbacks.plots import plot_run

    print(plot_run(args.workdir, args.output))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    dirs = _recipe_dirs()
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


def _add_recipe_commands(groups) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    from fedtrain.data.convert import FORMATS

    parser = argparse.ArgumentParser(prog="fedtrain", description="Federated learning simulation on JAX.")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    _add_recipe_commands(groups)

    data = groups.add_parser("data", help="inspect, convert and partition federated datasets")
    sub = data.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("inspect", aliases=["info"], help="clients, examples, size quantiles, features")
    p.add_argument("path")
    p.add_argument("--split", help="split of a TFF SQLite file")
    p.add_argument("--histogram", metavar="PNG", help="write a histogram of client sizes")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_data_inspect)

    p = sub.add_parser("convert", help="copy a store into another format")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--format", choices=FORMATS, help="output format (default: by extension; .h5 HDF5, "
                   ".npz npz, else FedJAX SQLite)")
    p.add_argument("--split", help="split to read from (and write to) a TFF SQLite file")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=cmd_data_convert)

    p = sub.add_parser("partition", help="split centralized arrays (.npz) into clients")
    p.add_argument("input", help=".npz of equal-length arrays, e.g. x and y")
    p.add_argument("output")
    p.add_argument("--method", choices=["iid", "dirichlet", "shards", "by_key", "sized"], default="dirichlet")
    p.add_argument("--num-clients", type=int, default=100)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--shards-per-client", type=int, default=2)
    p.add_argument("--distribution", choices=["lognormal", "powerlaw", "equal"], default="lognormal")
    p.add_argument("--label-key", default="y")
    p.add_argument("--key", default="client", help="array of natural keys for --method by_key")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=FORMATS)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=cmd_data_partition)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "handler", None) is cmd_train:
        args.overrides = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError, TypeError, ImportError) as err:
        print(f"fedtrain: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
