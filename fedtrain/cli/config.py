"""Recipes for ``fedtrain train``: finding a recipe file, importing its ``get_config`` and applying
``--config.KEY=VALUE`` overrides."""

from __future__ import annotations

import sys


def recipe_dirs() -> list:
    """``./recipes`` and the ``recipes/`` of the source tree this package sits in, those that exist."""
    from pathlib import Path

    here = Path.cwd() / "recipes"
    repo = Path(__file__).resolve().parents[2] / "recipes"  # fedtrain/cli/config.py -> the source tree
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
    for d in recipe_dirs():
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
