"""Multi-host runs on JAX's distributed runtime.

Every process runs the same script. Call :func:`initialize` first (before any
other JAX call); the trainer then splits each round's lanes over all devices
of all processes (``backend='sharded'``), each process reads only its own
lanes' clients, and every process receives the same new server state.
Callbacks that write files should do so only where :func:`is_chief` is true
(the built-in ones do).
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from typing import Any

import jax
import numpy as np


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None, timeout_s: int = 300) -> None:
    """Joins the distributed run (``jax.distributed.initialize`` with a clear error on failure).

    With no arguments, JAX detects the cluster (SLURM, Cloud TPU, Open MPI, or the
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables).
    On CPU the collectives use gloo.
    """
    if num_processes is not None and (process_id is None or not 0 <= process_id < num_processes):
        raise ValueError(f"process_id must be in [0, {num_processes}) for num_processes={num_processes}, "
                         f"got {process_id}.")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address and process_id:  # the runtime aborts the process if it cannot connect
        _wait_for_coordinator(coordinator_address, process_id, num_processes, timeout_s)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   local_device_ids=local_device_ids, initialization_timeout=int(timeout_s))
    except Exception as err:  # the runtime's errors do not say what to check
        where = coordinator_address or "the auto-detected coordinator"
        raise RuntimeError(
            f"could not join the distributed run at {where} as process {process_id} of {num_processes} "
            f"within {timeout_s} s ({type(err).__name__}: {err}). Check that process 0 is running and its "
            "port is reachable, and that every process was started with the same coordinator address and "
            "number of processes.") from err


def _wait_for_coordinator(address: str, process_id, num_processes, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"process {process_id} of {num_processes} could not reach the coordinator at {address} within "
                    f"{timeout_s} s ({err}). Check that process 0 is running and its port is reachable, and that "
                    "every process was started with the same coordinator address.") from err
            time.sleep(0.5)


def is_chief() -> bool:
    """True on the process that writes logs and checkpoints (process 0)."""
    return jax.process_index() == 0


def check_same_on_all_processes(**settings: Any) -> None:
    """Raises a clear error when the processes of a multi-host run were given different settings."""
    if jax.process_count() == 1:
        return
    text = json.dumps(settings, sort_keys=True, default=str)
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int64)
    from jax.experimental import multihost_utils

    digests = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1)
    if len(set(digests.tolist())) > 1:
        differing = [i for i, d in enumerate(digests) if d != digests[0]]
        raise ValueError(f"the processes of this multi-host run were started with different settings "
                         f"(processes {differing} differ from process 0; this process has {text}). "
                         "Run the same script with the same arguments and data on every process.")
