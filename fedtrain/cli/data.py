"""``fedtrain data {inspect,convert,partition}``: federated datasets on disk."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def _abs(path: str) -> str:
    """A path from the command line made absolute before anything opens it."""
    return os.path.abspath(os.fspath(path))


def _output(path: str) -> str:
    """An output path made absolute, its folder created."""
    path = _abs(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from fedtrain.data.convert import describe, detect_format, open_store

    path = _abs(args.path)
    data = open_store(path, split=args.split)
    info = describe(data)
    sizes = info.pop("sizes")
    info = {"path": args.path, "format": detect_format(path), **info}
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
        from fedtrain.logs.plots import _matplotlib

        Figure, FigureCanvasAgg = _matplotlib()  # a clear error naming fedtrain[plots] if missing
        fig = Figure(figsize=(6, 3.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.hist(sizes, bins=min(50, max(1, len(np.unique(sizes)))))
        ax.set_xlabel("examples per client")
        ax.set_ylabel("clients")
        ax.set_title(f"{info['num_clients']:,} clients, {info['num_examples']:,} examples")
        fig.tight_layout()
        fig.savefig(_output(args.histogram), dpi=100)
        print(f"  histogram written to {args.histogram}")
    if hasattr(data, "close"):
        data.close()
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from fedtrain.data.convert import convert, describe, open_store

    out = convert(_abs(args.input), _output(args.output), args.format, split=args.split, overwrite=args.overwrite)
    info = describe(open_store(out, split=args.split if args.format == "tff-sqlite" else None))
    print(f"wrote {out}: {info['num_clients']:,} clients, {info['num_examples']:,} examples")
    return 0


def cmd_data_partition(args: argparse.Namespace) -> int:
    from fedtrain.data import partitioners
    from fedtrain.data.convert import write_store

    with np.load(_abs(args.input), allow_pickle=False) as z:
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
    write_store(part.apply(arrays), _output(args.output), args.format, overwrite=args.overwrite)
    print(part.format_summary(labels))
    print(f"wrote {args.output}")
    return 0


def add_data_commands(groups) -> None:
    from fedtrain.data.convert import FORMATS

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
