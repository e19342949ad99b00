"""Cached downloads: ``.partial`` file, resume with HTTP ranges, size and sha256 checks, atomic rename.

Files live in ``cache_dir``, else ``$FEDTRAIN_DATA_DIR``, else ``~/.cache/fedtrain``.
A failed download never leaves a file under the final name; an interrupted
one keeps ``<name>.partial`` and the next call resumes from it.
"""

from __future__ import annotations

import hashlib
import http.client
import lzma
import os
import shutil
import socket
import tarfile
import urllib.error
import urllib.request
from typing import NamedTuple

CHUNK = 1 << 20


class Remote(NamedTuple):
    """A file to fetch: its URL, cache file name, and (when known) byte size and sha256."""

    url: str
    filename: str
    size: int | None = None
    sha256: str | None = None


class DownloadError(RuntimeError):
    """A download failed (no network, dropped connection, checksum mismatch)."""


def data_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """The cache directory: ``cache_dir``, ``$FEDTRAIN_DATA_DIR`` or ``~/.cache/fedtrain`` (created)."""
    path = os.fspath(cache_dir) if cache_dir is not None else (
        os.environ.get("FEDTRAIN_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fedtrain"))
    os.makedirs(path, exist_ok=True)
    return path


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _by_hand(remote: Remote, dest: str) -> str:
    return (f"To install it by hand, download {remote.url} on a machine with network access and copy it to "
            f"{dest} (or set FEDTRAIN_DATA_DIR / cache_dir to the folder holding {remote.filename}).")


def _verify(path: str, remote: Remote, expected_size: int | None) -> None:
    size = os.path.getsize(path)
    want = remote.size if remote.size is not None else expected_size
    if want is not None and size != want:
        raise DownloadError(f"{remote.url}: got {size} bytes, expected {want}.")
    if remote.sha256 is not None:
        digest = sha256_of(path)
        if digest != remote.sha256:
            raise DownloadError(f"{remote.url}: sha256 {digest} does not match the expected {remote.sha256}; "
                                "the file on the server changed or was corrupted in transit.")


def _progress(enabled: bool):
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), transient=True, disable=not enabled)


def download(remote: Remote, cache_dir: str | os.PathLike | None = None, *, progress: bool = True,
             timeout: float = 60.0) -> str:
    """Path of ``remote`` in the cache, downloading it first if needed (resuming a ``.partial``)."""
    folder = data_dir(cache_dir)
    dest = os.path.join(folder, remote.filename)
    if os.path.exists(dest):
        if remote.size is not None and os.path.getsize(dest) != remote.size:
            raise DownloadError(f"cached {dest} has {os.path.getsize(dest)} bytes, expected {remote.size}; "
                                f"delete it to download it again. {_by_hand(remote, dest)}")
        return dest
    partial = dest + ".partial"
    offset = os.path.getsize(partial) if os.path.exists(partial) else 0
    if remote.size is not None and offset > remote.size:
        os.remove(partial)
        offset = 0
    request = urllib.request.Request(remote.url, headers={"User-Agent": "fedtrain"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left to send: the partial file is complete
            response, expected = None, offset
        else:
            raise DownloadError(f"could not download {remote.url}: HTTP {err.code} {err.reason}. "
                                f"{_by_hand(remote, dest)}") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"could not download {remote.url} ({reason}); no network? "
                            f"{_by_hand(remote, dest)}") from err
    if response is not None:
        with response:
            if offset and response.status != 206:
                offset = 0  # the server ignored the range: start over
            length = response.headers.get("Content-Length")
            expected = offset + int(length) if length is not None else remote.size
            received = offset
            try:
                with open(partial, "ab" if offset else "wb") as f, _progress(progress) as bar:
                    task = bar.add_task(remote.filename, total=expected, completed=offset)
                    while True:
                        block = response.read(CHUNK)
                        if not block:
                            break
                        f.write(block)
                        received += len(block)
                        bar.update(task, completed=received)
            except (http.client.IncompleteRead, ConnectionError, socket.timeout, OSError) as err:
                raise DownloadError(f"connection to {remote.url} dropped after {os.path.getsize(partial)} bytes "
                                    f"({type(err).__name__}); call again to resume from {partial}.") from err
            if expected is not None and received < expected:
                raise DownloadError(f"connection to {remote.url} dropped after {received} of {expected} bytes; "
                                    f"call again to resume from {partial}.")
    try:
        _verify(partial, remote, expected)
    except DownloadError as err:
        os.remove(partial)
        raise DownloadError(f"{err} The partial download was deleted; call again to retry. "
                            f"{_by_hand(remote, dest)}") from None
    os.replace(partial, dest)
    return dest


def lzma_decompress(path: str, dest: str | None = None) -> str:
    """Decompresses ``path`` (``.lzma``/``.xz``) next to it, atomically; reuses an existing result."""
    dest = dest or path.rsplit(".", 1)[0]
    if os.path.exists(dest):
        return dest
    partial = dest + ".partial"
    try:
        with lzma.open(path) as src, open(partial, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
    except (lzma.LZMAError, EOFError) as err:
        os.remove(partial)
        raise DownloadError(f"{path} is not a valid lzma file ({err}); delete it and download it again.") from err
    os.replace(partial, dest)
    return dest


def _check_member_name(member: str) -> None:
    """``member`` names the cache file it is extracted to, so it must stay inside the cache folder."""
    parts = member.replace("\\", "/").split("/")
    if not member or os.path.isabs(member) or member.startswith(("/", "\\")) or ".." in parts or "" in parts:
        raise ValueError(f"member name {member!r} must be a relative path without '..'; it names a file in the "
                         "cache folder.")


def extract_member(archive: str, member: str, dest: str) -> str:
    """Extracts one file of a tar archive (``.tar.bz2`` etc.) to ``dest``, atomically; reuses it.

    Only that member's bytes are copied, to ``dest``: the archive's own paths are never used to
    write anything, and a member that is a link, device or folder is refused, not followed.
    """
    if os.path.exists(dest):
        return dest
    _check_member_name(member)
    partial = dest + ".partial"
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            match = [m for m in members if m.name == member or m.name.endswith("/" + member)]
            if not match:
                raise DownloadError(f"{archive} has no member {member!r} (members: {[m.name for m in members[:10]]}).")
            info = match[0]
            if not info.isfile():
                kind = ("symlink" if info.issym() else "hard link" if info.islnk() else "folder" if info.isdir()
                        else "special file")
                raise DownloadError(f"{archive}: member {info.name!r} is a {kind}, not a regular file; it is not "
                                    "followed. The archive is not the expected one: delete it and download it again.")
            src = tar.extractfile(info)
            with src, open(partial, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
    except (tarfile.TarError, EOFError, OSError) as err:
        if os.path.exists(partial):
            os.remove(partial)
        raise DownloadError(f"{archive} is not a readable tar archive ({err}); delete it and download it "
                            "again.") from err
    os.replace(partial, dest)
    return dest


def fetch_lzma(remote: Remote, cache_dir=None, *, progress: bool = True) -> str:
    """The decompressed file of an ``.lzma`` download (reused if already decompressed in the cache)."""
    dest = os.path.join(data_dir(cache_dir), remote.filename.rsplit(".", 1)[0])
    if os.path.exists(dest):
        return dest
    return lzma_decompress(download(remote, cache_dir, progress=progress), dest)


def fetch_member(remote: Remote, member: str, cache_dir=None, *, progress: bool = True) -> str:
    """One file of a tar download (reused if already extracted in the cache)."""
    _check_member_name(member)
    dest = os.path.join(data_dir(cache_dir), member)
    if os.path.exists(dest):
        return dest
    return extract_member(download(remote, cache_dir, progress=progress), member, dest)
