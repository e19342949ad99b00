"""The ``fedtrain`` command line: ``fedtrain {train,eval,plot,recipes}`` and ``fedtrain data {inspect,convert,partition}``.

One module per command group: ``fedtrain.cli.recipes`` (train, eval, plot, recipes; recipe lookup and
``--config.KEY=VALUE`` overrides in ``fedtrain.cli.config``) and ``fedtrain.cli.data`` (data ...).
Each subcommand is a function ``cmd_<group>_<name>(args) -> int`` registered by its module's
``add_<group>_commands``; add a command by adding a parser and its handler there.
"""

from __future__ import annotations

import argparse
import sys

from fedtrain.cli.data import add_data_commands
from fedtrain.cli.recipes import add_recipe_commands, cmd_train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtrain", description="Federated learning simulation on JAX.")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    add_recipe_commands(groups)
    add_data_commands(groups)
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
