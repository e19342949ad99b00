"""The checkpoint format: what a step directory holds, how it is verified, and restoring it.

A checkpoint step is the number of completed rounds. It holds the server state
(parameters, server optimizer state) beside the aggregator's state, the
per-client states of stateful algorithms, and JSON metadata: completed rounds,
seed, fedtrain version, format number, algorithm, model structure, History,
client hyperparameters, the state of callbacks that have one, a SHA-256 of
all arrays (``checksum``) and a SHA-256 of every other metadata value
(``metadata_checksum``), so an edited round number, History or callback state is
caught like a damaged array. Samplers and per-round randomness are pure functions of (seed,
round), so restoring a step and running the remaining rounds gives exactly the
results of an uninterrupted run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedtrain.callbacks.base import History

FORMAT_VERSION = 2  # 2: the aggregator's state is saved beside the server state, not inside it
log = logging.getLogger("fedtrain")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """A checkpoint was written by a different model, algorithm or client state layout."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint step's own files are damaged: missing, truncated or altered (proven by what was read)."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail or message  # what was found, without the step's name


class CheckpointReadError(CheckpointError):
    """A checkpoint step could not be read for a reason outside its files (the path, permissions,
    the installed packages, a bug): never treated as damage, so nothing is skipped or set aside."""


class CheckpointUnreadableError(CheckpointError):
    """Every step of a checkpoint directory is damaged: there is nothing to resume from."""

    def __init__(self, message: str, directory: Path, steps: list[int]) -> None:
        super().__init__(message)
        self.directory = directory
        self.steps = steps  # the steps tried, newest first


class CheckpointLockedError(CheckpointError):
    """Another training run holds the checkpoint directory's lock."""


# A step directory fedtrain writes: ASCII digits only (str.isdigit() also accepts '²', which int() refuses).
_STEP_NAME = re.compile(r"[0-9]+\Z", re.ASCII)
_warned_foreign: set[str] = set()
# Read errors that may pass on their own: retried before anything is concluded.
_TRANSIENT_ERRNO = {errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT,
                    getattr(errno, "ESTALE", -1)}
READ_ATTEMPTS = 3
READ_BACKOFF_S = 0.05


def absolute(directory: str | os.PathLike) -> Path:
    """``directory`` as an absolute path. Orbax refuses relative paths, and a relative path means
    something else once the working directory changes, so every path is made absolute on the way in."""
    return Path(os.path.abspath(os.fspath(directory)))


def _version() -> str:
    from fedtrain._version import __version__

    return __version__


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


# ---------------------------------------------------------------------- what is saved
def _structure(tree) -> list[list]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [[jax.tree_util.keystr(p), list(np.shape(x)), str(np.asarray(x).dtype if not hasattr(x, "dtype")
                                                              else x.dtype)] for p, x in flat]


def _server_tree(trainer) -> dict:
    """What the ``server_state`` item holds: the algorithm's state and the aggregator's."""
    return {"server": trainer.server_state, "aggregator": trainer.aggregator_state}


def _checksum(server_state, client_rows: dict[str, np.ndarray] | None) -> str:
    h = hashlib.sha256()
    for x in jax.tree.leaves(server_state):
        a = np.ascontiguousarray(np.asarray(x))
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    for name in sorted(client_rows or {}):
        a = np.ascontiguousarray(client_rows[name])
        h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _stack_clients(trainer) -> tuple[list[str], dict[str, np.ndarray] | None]:
    if trainer.client_states is None or len(trainer.client_states) == 0:
        return [], None
    rows = trainer.client_states.state_dict()
    ids = list(rows)
    n = len(rows[ids[0]])
    return ids, {f"leaf_{i:04d}": np.stack([rows[c][i] for c in ids]) for i in range(n)}


def _callback_arrays(trainer) -> dict[str, Any]:
    """Server-state-shaped pytrees that callbacks keep (e.g. EarlyStopping's best weights)."""
    out = {}
    for i, cb in enumerate(getattr(trainer.callbacks, "callbacks", None) or []):
        tree = cb.array_state() if hasattr(cb, "array_state") else None
        if tree is not None:
            out[f"{i}:{type(cb).__name__}"] = tree
    return out


def _callback_states(trainer) -> dict[str, Any]:
    out = {}
    for i, cb in enumerate(getattr(trainer.callbacks, "callbacks", []) or []):
        if isinstance(cb, History) or not hasattr(cb, "state_dict"):
            continue
        out[f"{i}:{type(cb).__name__}"] = cb.state_dict()
    return out


def _history_with(trainer, round_index: int, logs: dict) -> dict:
    h = History()
    h.load_state_dict(trainer.history.state_dict())
    if not h.rounds or h.rounds[-1] != round_index:
        h.on_round_end(round_index, dict(logs))
    return h.state_dict()


def _metadata_digest(meta: dict) -> str:
    """SHA-256 of every metadata value except the digest itself, over canonical JSON."""
    body = {k: v for k, v in meta.items() if k != "metadata_checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def seal_metadata(meta: dict) -> dict:
    """``meta`` as JSON will read it back, with ``metadata_checksum`` covering all of it."""
    meta = json.loads(json.dumps(meta))
    meta["metadata_checksum"] = _metadata_digest(meta)
    return meta


def _verify_metadata(meta: dict, step_dir: Path) -> None:
    saved = meta.get("metadata_checksum")
    if saved is None:
        # Written before the metadata was checksummed: accepted, its arrays are still verified.
        key = str(step_dir)
        if key not in _warned_foreign:
            _warned_foreign.add(key)
            warnings.warn(f"checkpoint {step_dir} was written by fedtrain {meta.get('fedtrain_version')} without "
                          "a metadata checksum: its arrays are verified, its round, History and callback state "
                          "are not.", UserWarning, stacklevel=5)
        return
    if saved != _metadata_digest(meta):
        raise CheckpointCorruptError(
            f"{step_dir}: the metadata values do not match the checksum stored with them (edited or damaged)",
            "the metadata values do not match the checksum stored with them (edited or damaged)")


def _metadata(trainer, completed: int, history: dict, client_ids: list[str], client_rows, extra: dict) -> dict:
    from fedtrain._version import __version__

    client_structure = None
    if trainer.client_states is not None:
        client_structure = _structure(trainer.client_states.initial_state())
    return {
        "format": FORMAT_VERSION,
        "fedtrain_version": __version__,
        "round": int(completed),
        "seed": int(trainer.seed),
        "algorithm": trainer.algorithm.name,
        "model": getattr(trainer.model_fns, "name", None),
        "structure": _structure(_server_tree(trainer)),
        "client_structure": client_structure,
        "client_ids": client_ids,
        "client_hyperparams": {k: float(v) for k, v in trainer.client_hyperparams.items()},
        "history": history,
        "callbacks": _callback_states(trainer),
        "callback_array_keys": sorted(_callback_arrays(trainer)),
        "checksum": _checksum(_server_tree(trainer), client_rows),
        **extra,
    }


# ---------------------------------------------------------------------- reading
def is_own_step(path: Path) -> bool:
    """True for a step directory as fedtrain writes it: an ASCII number naming a real directory."""
    return bool(_STEP_NAME.match(path.name)) and not path.is_symlink() and path.is_dir()


def _foreign(path: Path) -> str | None:
    """Why ``path`` looks like a step but is not one fedtrain wrote (None for anything else)."""
    name = path.name
    if _STEP_NAME.match(name):
        if path.is_symlink():
            return "it is a symbolic link"
        if not path.is_dir():
            return "it is not a directory"
        return None
    if name.isdigit() or name.isdecimal() or name.isnumeric():
        return "its name is not an ASCII step number"
    return None


def _steps(directory: Path) -> list[int]:
    """The steps of ``directory``; anything that looks like a step but is not one fedtrain wrote (a
    symbolic link, a file, a name of non-ASCII digits) is ignored with one warning."""
    if not directory.is_dir():
        return []
    steps = []
    for p in directory.iterdir():
        if is_own_step(p):
            steps.append(int(p.name))
            continue
        why = _foreign(p)
        if why and str(p) not in _warned_foreign:
            _warned_foreign.add(str(p))
            warnings.warn(f"ignoring {p} in the checkpoint directory: {why}, so it is not a step fedtrain "
                          "wrote; it is never read or deleted.", RuntimeWarning, stacklevel=3)
    return sorted(set(steps))


def _read_metadata(step_dir: Path) -> dict:
    path = step_dir / "metadata" / "metadata"
    if not path.exists():
        if not (step_dir / "server_state").is_dir():
            raise CheckpointMismatchError(
                f"{step_dir} is not a fedtrain checkpoint step (it has neither metadata/ nor server_state/); "
                "restore from a directory that OrbaxCheckpoint wrote.")
        raise CheckpointCorruptError(f"{step_dir} has no metadata file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointCorruptError(f"{path} is not valid JSON ({e})") from e


def _check_files(step_dir: Path, meta: dict) -> None:
    """Every item a finished step must hold (orbax writes a step whole, then renames it into place)."""
    items = ["server_state"]
    if meta.get("client_ids"):
        items.append("client_states")
    if meta.get("callback_array_keys"):
        items.append("callback_arrays")
    for item in items:
        if not (step_dir / item / "_METADATA").is_file():
            raise CheckpointCorruptError(f"{step_dir / item} is missing its orbax _METADATA file")


# Tensorstore status codes that name damage to the files read (a missing, short or undecodable file).
# FAILED_PRECONDITION: e.g. "Truncated Zstd-compressed stream" when a chunk file lost its end
_DAMAGE_STATUS = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION")


def _damage_evidence(err: BaseException, step_dir: Path, depth: int = 0) -> BaseException | None:
    """The exception in ``err``'s chain that proves the files of ``step_dir`` are damaged, or None;
    anything else (a relative or wrong path, permissions, a missing package, a bug) is a usage error."""
    if isinstance(err, CheckpointCorruptError):
        return err
    if isinstance(err, CheckpointError) or not step_dir.is_dir():
        return None
    if isinstance(err, (json.JSONDecodeError, UnicodeDecodeError)):
        return err  # a JSON file orbax wrote in the step no longer parses
    text = str(err)
    inside = str(step_dir) + os.sep
    names_step = inside in text
    if isinstance(err, FileNotFoundError):  # a file the step must hold is gone
        named = names_step or (err.filename is not None and str(absolute(err.filename)).startswith(inside))
        return err if named else None
    if type(err) in (ValueError, Exception) and text.startswith(_DAMAGE_STATUS) and names_step:
        return err  # tensorstore's status, as raised or wrapped by orbax
    cause = err.__cause__ or err.__context__  # orbax may re-raise the status inside an exception of its own
    return _damage_evidence(cause, step_dir, depth + 1) if cause is not None and depth < 8 else None


def one_line(text: str, limit: int = 200) -> str:
    """The first line of ``text`` without a TensorStore spec, at most ``limit`` characters."""
    text = str(text).split(" [tensorstore_spec", 1)[0].strip()
    first = text.splitlines()[0].strip() if text else ""
    return first if len(first) <= limit else first[: limit - 3].rstrip() + "..."


def _short(err: BaseException) -> str:
    text = str(err).split(" [tensorstore_spec", 1)[0].strip()
    return f"{type(err).__name__}: {text[:400]}{'...' if len(text) > 400 else ''}"


def _read_failure(step_dir: Path, err: BaseException) -> CheckpointError:
    """What a failed read of ``step_dir`` means: damage (the caller may fall back) or a usage error."""
    if isinstance(err, CheckpointMismatchError):
        return err
    evidence = _damage_evidence(err, step_dir)
    if evidence is not None:
        return evidence if isinstance(evidence, CheckpointCorruptError) else CheckpointCorruptError(
            f"{step_dir} is damaged: {_short(evidence)}", _short(evidence))
    if isinstance(err, CheckpointReadError):
        return err
    return CheckpointReadError(
        f"cannot read checkpoint {step_dir}: this is not a damaged checkpoint, so it was neither skipped nor "
        f"set aside; reading it failed with {_short(err)}. Fix the cause (the path, permissions, the installed "
        "orbax/tensorstore) and retry.")


def _check_format(meta: dict, where: Path) -> None:
    fmt = meta.get("format")
    if not isinstance(fmt, int):
        raise CheckpointError(f"{where}: metadata has no format number")
    if fmt > FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{where} was written in checkpoint format {fmt} by fedtrain {meta.get('fedtrain_version')}; this "
            f"fedtrain reads format <= {FORMAT_VERSION}. Upgrade fedtrain to restore it.")
    if fmt < FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{where} was written in checkpoint format {fmt} by fedtrain {meta.get('fedtrain_version')}; this "
            f"fedtrain ({_version()}) reads format {FORMAT_VERSION}: since 0.2.0 the aggregator's state is kept "
            "beside the server state, not inside it. Restore it with the fedtrain version that wrote it "
            "(pip install 'fedtrain<0.2'), or start a new checkpoint directory.")


def _check_compatible(trainer, meta: dict, where: Path) -> None:
    _check_format(meta, where)
    problems = []
    if meta.get("algorithm") != trainer.algorithm.name:
        problems.append(f"algorithm: saved {meta.get('algorithm')!r}, this trainer {trainer.algorithm.name!r}")
    model = getattr(trainer.model_fns, "name", None)
    if meta.get("model") and model and meta["model"] != model:
        problems.append(f"model: saved {meta['model']!r}, this trainer {model!r}")
    problems += _diff_structure("server state", meta.get("structure") or [], _structure(_server_tree(trainer)))
    here = None if trainer.client_states is None else _structure(trainer.client_states.initial_state())
    saved = meta.get("client_structure")
    if (saved is None) != (here is None):
        problems.append(f"client state: saved {'none' if saved is None else 'per-client state'}, this algorithm "
                        f"{'has none' if here is None else 'keeps per-client state'}")
    elif saved is not None:
        problems += _diff_structure("client state", saved, here)
    if problems:
        raise CheckpointMismatchError(
            f"the checkpoint {where} does not fit this trainer:\n  - " + "\n  - ".join(problems[:12])
            + ("\n  - ..." if len(problems) > 12 else "")
            + "\nRestore it into the model and algorithm that wrote it, or use another checkpoint directory.")


def _diff_structure(what: str, saved: list, here: list) -> list[str]:
    saved_d = {p: (tuple(s), d) for p, s, d in saved}
    here_d = {p: (tuple(s), d) for p, s, d in here}
    out = []
    for p in saved_d.keys() - here_d.keys():
        out.append(f"{what} {p}: in the checkpoint, not in this trainer")
    for p in here_d.keys() - saved_d.keys():
        out.append(f"{what} {p}: in this trainer, not in the checkpoint")
    for p in saved_d.keys() & here_d.keys():
        if saved_d[p] != here_d[p]:
            (s1, d1), (s2, d2) = saved_d[p], here_d[p]
            out.append(f"{what} {p}: saved {d1}{list(s1)}, this trainer {d2}{list(s2)}")
    return sorted(out)


def _load_step(trainer, directory: Path, step: int) -> dict:
    """Reads and verifies one step; returns the trainer state dict it holds."""
    ocp = _ocp()
    step_dir = absolute(directory) / str(step)
    meta = _read_metadata(step_dir)
    _check_format(meta, step_dir)
    _verify_metadata(meta, step_dir)
    _check_compatible(trainer, meta, step_dir)
    _check_files(step_dir, meta)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _server_tree(trainer))
    handler = ocp.StandardCheckpointHandler()
    ckptr = ocp.Checkpointer(handler)
    try:
        server_state = ckptr.restore(step_dir / "server_state", args=ocp.args.StandardRestore(abstract))
        rows = None
        if meta.get("client_ids"):
            rows = ckptr.restore(step_dir / "client_states", args=ocp.args.StandardRestore())
            rows = {k: np.asarray(v) for k, v in rows.items()}
        arrays = {}
        if (step_dir / "callback_arrays").exists():
            keys = meta.get("callback_array_keys") or []
            arrays = ckptr.restore(step_dir / "callback_arrays",
                                   args=ocp.args.StandardRestore({k: abstract["server"] for k in keys}))
    finally:
        ckptr.close()
    if _checksum(server_state, rows) != meta.get("checksum"):
        raise CheckpointCorruptError(f"{step_dir}: the arrays do not match the checksum in the metadata")
    client_states = None
    if rows is not None:
        names = sorted(rows)
        client_states = {cid: [rows[n][i] for n in names] for i, cid in enumerate(meta["client_ids"])}
    return {"server_state": server_state["server"], "aggregator_state": server_state["aggregator"],
            "client_states": client_states, "round": meta["round"],
            "seed": meta["seed"], "algorithm": meta["algorithm"], "history": meta.get("history"),
            "client_hyperparams": meta.get("client_hyperparams"), "meta": meta, "callback_arrays": arrays}


def _apply(trainer, state: dict) -> None:
    meta = state.pop("meta")
    arrays = state.pop("callback_arrays", None) or {}
    if int(meta["seed"]) != trainer.seed:
        warnings.warn(f"the checkpoint was written with seed {meta['seed']}, this trainer has seed {trainer.seed}; "
                      "the remaining rounds follow this trainer's seed.", UserWarning, stacklevel=4)
    if trainer.client_states is not None and state["client_states"] is None:
        state["client_states"] = {}
    trainer.load_state_dict(state)
    cbs = getattr(trainer.callbacks, "callbacks", None) or []
    saved = meta.get("callbacks") or {}
    for i, cb in enumerate(cbs):
        key = f"{i}:{type(cb).__name__}"
        if key in saved and hasattr(cb, "load_state_dict") and not isinstance(cb, History):
            cb.load_state_dict(saved[key])
        if key in arrays and hasattr(cb, "load_array_state"):
            cb.load_array_state(arrays[key])


def _set_aside(directory: Path, step: int) -> None:
    src = directory / str(step)
    dst = directory / f"{step}.corrupt"
    i = 1
    while dst.exists():
        dst = directory / f"{step}.corrupt{i}"
        i += 1
    try:
        src.rename(dst)
    except OSError:
        pass


def _transient(err: BaseException) -> bool:
    """A read error that may pass on its own (an I/O error, memory pressure): retried, never damage."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, MemoryError):
            return True
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNO:
            return True
        if isinstance(err, ValueError) and str(err).startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED")):
            return True
        err = err.__cause__ or err.__context__
    return False


def _drop_pending_reads(err: BaseException) -> None:
    """Frees the read coroutines a failed orbax restore leaves in ``err``'s frames, so their
    "coroutine ... was never awaited" RuntimeWarning is not printed at some later, unrelated point."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        traceback.clear_frames(err.__traceback__)


def _load(trainer, directory: Path, step: int) -> dict:
    """Reads one step; a transient error is retried ``READ_ATTEMPTS`` times with a short backoff, then
    raised as :class:`CheckpointReadError` (the step is left as it is)."""
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return _load_step(trainer, directory, step)
        except Exception as e:  # MemoryError too: it is an Exception
            _drop_pending_reads(e)
            if _transient(e):
                if attempt < READ_ATTEMPTS:
                    log.warning("reading checkpoint step %d in %s failed (%s); retrying", step, directory,
                                one_line(f"{type(e).__name__}: {e}"))
                    time.sleep(READ_BACKOFF_S * 2 ** (attempt - 1))
                    continue
                raise CheckpointReadError(
                    f"cannot read checkpoint step {step} in {directory}: {one_line(f'{type(e).__name__}: {e}')} "
                    f"(a transient read error, {READ_ATTEMPTS} attempts). This is not damage: no step was skipped, "
                    "renamed or deleted. Retry when the storage or memory problem is fixed.") from e
            failure = _read_failure(directory / str(step), e)
            if failure is e:
                raise
            raise failure from e
    raise AssertionError("unreachable")


def restore_latest(trainer, directory, step: int | None = None, *, set_aside: bool = False) -> dict | None:
    """Restores ``step`` (or the newest readable step) into ``trainer``; returns its metadata or None.

    A newest step whose files are damaged (:class:`CheckpointCorruptError`: missing or truncated files,
    unparseable JSON, arrays or metadata that do not match their checksums) is skipped with a one-line
    warning and, with ``set_aside``, renamed ``<step>.corrupt`` once an older step was read, so it is
    never overwritten or read again. When every step is damaged, :class:`CheckpointUnreadableError`
    is raised and nothing is renamed. A transient read error (EIO, memory) is retried a few times,
    then raised as :class:`CheckpointReadError`. Any other
    failure to read raises and changes nothing on disk: a step written by a different model or
    algorithm (:class:`CheckpointMismatchError`), or a read that fails for a reason outside the
    step's files, such as the path, permissions or the installed packages (:class:`CheckpointReadError`).
    """
    directory = absolute(directory)
    steps = _steps(directory)
    if step is not None:
        if int(step) not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {directory} (steps: {steps})")
        state = _load(trainer, directory, int(step))
        meta = state["meta"]
        _apply(trainer, state)
        return meta
    bad = []
    for s in reversed(steps):
        try:
            state = _load(trainer, directory, s)
        except CheckpointCorruptError as e:  # damaged: fall back to the previous step
            bad.append(s)
            warnings.warn(f"checkpoint {directory / str(s)} is unreadable (damaged: {one_line(e.detail)}); "
                          "falling back to the previous one.", RuntimeWarning, stacklevel=3)
            continue
        meta = state["meta"]
        _apply(trainer, state)
        if set_aside:
            for b in bad:
                _set_aside(directory, b)
        return meta
    if bad:
        raise CheckpointUnreadableError(
            f"no readable checkpoint in {directory}: every step is damaged (steps tried: "
            f"{', '.join(map(str, bad))}); nothing was renamed or deleted. Refusing to start over from round 0 "
            "on its own: pass on_unreadable='restart' to OrbaxCheckpoint/BackupAndRestore (fedtrain train "
            "--restart-if-unreadable) to set them aside as <step>.corrupt and train from round 0, or restore "
            "the directory from a backup.", directory, bad)
    return None


def set_aside_steps(directory, steps: list[int]) -> None:
    """Renames each step ``<step>.corrupt`` so it is never read or overwritten again."""
    for s in steps:
        _set_aside(absolute(directory), s)


def restore_trainer(trainer, directory, step: int | None = None) -> int:
    """``trainer.restore``: loads a checkpoint (newest good one by default); returns completed rounds."""
    directory = absolute(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    meta = restore_latest(trainer, directory, step)
    if meta is None:
        raise CheckpointError(f"no checkpoint in {directory}")
    return int(meta["round"])


def latest_step(directory) -> int | None:
    """The newest finished step in an OrbaxCheckpoint directory (None if there is none)."""
    steps = _steps(absolute(directory))
    return steps[-1] if steps else None


