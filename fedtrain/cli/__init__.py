"""The ``fedtrain`` command line: ``fedtrain {train,eval,plot,recipes}`` and ``fedtrain data {inspect,convert,partition}``.

One module per command group: ``fedtrain.cli.recipes`` (train, eval, plot, recipes; recipe lookup and
``--config.KEY=VALUE`` overrides in ``fedtrain.cli.config``) and ``fedtrain.cli.data`` (data ...).
Each subcommand is a function ``cmd_<group>_<name>(args) -> int`` registered by its module's
``add_<group>_commands``; add a command by adding a parser and its handler there.
"""

from __future__ import annotations

import argparse
import errno
import signal
import sys

from fedtrain.cli.data import add_data_commands
from fedtrain.cli.recipes import add_recipe_commands, cmd_train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtrain", description="Federated learning simulation on JAX.")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    add_recipe_commands(groups)
    add_data_commands(groups)
    return parser


def _hint(err: OSError) -> str:
    if isinstance(err, PermissionError) or err.errno == errno.EROFS:
        return "; make it writable (chmod u+w) or pass another --workdir."
    if isinstance(err, (NotADirectoryError, FileExistsError)):
        return "; a file is where a directory is expected: pass another --workdir."
    return "."


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "handler", None) is cmd_train:
        args.overrides = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for the resume hint
    try:
        return args.handler(args)
    except KeyboardInterrupt as err:  # outside `fedtrain train`'s own handling: one line, no traceback
        signum = int(getattr(err, "signum", signal.SIGINT))
        print(f"fedtrain: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except OSError as err:
        if err.errno is None or err.filename is None:  # raised with a message of ours
            print(f"fedtrain: error: {err}", file=sys.stderr)
        else:
            print(f"fedtrain: error: {err.filename}: {err.strerror}{_hint(err)}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, RuntimeError, TypeError, ImportError) as err:
        print(f"fedtrain: error: {err}", file=sys.stderr)
        return 2
