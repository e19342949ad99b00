"""The idx format of MNIST and Fashion-MNIST (``*-ubyte``, optionally gzipped).

Header: two zero bytes, a dtype code, the number of dimensions, then each
dimension as a big-endian uint32; the data follows in C order, big-endian.
"""

from __future__ import annotations

import gzip
import math
import os

import numpy as np

DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
CODES = {np.dtype(v).newbyteorder("=").str: k for k, v in DTYPES.items()}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array in an idx file (``.gz`` read transparently), in native byte order."""
    path = os.fspath(path)
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read ({err}); the file is corrupt or truncated: fetch it again.") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in DTYPES:
        raise ValueError(f"{path} is not an idx file (header {raw[:4]!r}); expected MNIST-style *-ubyte data.")
    dtype, ndim = np.dtype(DTYPES[raw[2]]), raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: the header of {ndim} dimensions is truncated; fetch the file again.")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    start = 4 + 4 * ndim
    need = math.prod(shape) * dtype.itemsize  # exact: np.prod would wrap around for crafted huge shapes
    if len(raw) - start != need:
        raise ValueError(f"{path}: header says shape {shape} ({need} bytes) but {len(raw) - start} bytes follow; "
                         "the file is truncated or corrupt: fetch it again.")
    return np.frombuffer(raw, dtype, offset=start).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(array: np.ndarray, path: str | os.PathLike) -> str:
    """Writes ``array`` as an idx file (gzipped if ``path`` ends in ``.gz``)."""
    array = np.asarray(array)
    key = array.dtype.newbyteorder("=").str
    if key not in CODES:
        raise ValueError(f"dtype {array.dtype} has no idx code; use uint8, int8, int16, int32, float32 or float64.")
    code = CODES[key]
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    payload = header + array.astype(DTYPES[code]).tobytes()
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)
    return path
