"""Cached downloads: ``.partial`` file, validated resume, size and sha256 checks, atomic rename, sidecar records.

Files live in ``cache_dir``, else ``$FEDTRAIN_DATA_DIR``, else ``~/.cache/fedtrain``.
A failed download never leaves a file under the final name; an interrupted
one keeps ``<name>.partial`` (and the server's validator in
``<name>.partial.json``) and the next call resumes from it.

What is accepted:

- a resume only with a validator: ``Range`` plus ``If-Range`` (the ETag, or
  Last-Modified) recorded when the download started; without one the
  download restarts. A ``200`` answer to a range request restarts it (never
  appended), and so does a ``206`` whose ``Content-Range`` does not start at
  the offset asked or whose validator changed (a server that ignores
  ``If-Range``);
- a transfer shorter than its ``Content-Length`` (or ``Content-Range``
  total) is refused and kept to resume; one with neither length nor chunked
  framing is refused unless the file has a pinned size or sha256, since a
  cut-off transfer could not be told from a complete one;
- every file in the cache (downloaded, decompressed or extracted) has a
  sidecar ``<file>.sha256`` (JSON: size, sha256, mtime), written atomically
  once the file is complete. Each later use checks the size, and re-hashes
  the file when its mtime changed; a difference raises ``DownloadError``
  naming the file and the fix (delete it to fetch it again).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import lzma
import os
import re
import socket
import tarfile
import urllib.error
import urllib.request
from typing import NamedTuple

CHUNK = 1 << 20
SIDECAR_SUFFIX = ".sha256"


class Remote(NamedTuple):
    """A file to fetch: its URL, cache file name, and (when known) byte size and sha256."""

    url: str
    filename: str
    size: int | None = None
    sha256: str | None = None


class DownloadError(RuntimeError):
    """A download failed (no network, dropped connection, checksum mismatch) or a cached file changed."""


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


# -- sidecar records -------------------------------------------------------------------------------------------------

def sidecar_path(path: str | os.PathLike) -> str:
    """Where the size and sha256 of a cached file are recorded: ``<file>.sha256``."""
    return os.fspath(path) + SIDECAR_SUFFIX


def _write_json(path: str, obj: dict) -> None:
    """Writes ``obj`` to ``path`` atomically (temporary file, fsync, rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove(*paths: str) -> None:
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def record(path: str | os.PathLike, digest: str | None = None) -> dict:
    """Records ``path``'s size, sha256 (``digest``, else computed) and mtime in its sidecar; returns the record.

    A cache folder that cannot be written keeps no record (the file is then checked against its
    pins only).
    """
    path = os.fspath(path)
    digest = digest or sha256_of(path)
    st = os.stat(path)
    info = {"file": os.path.basename(path), "size": st.st_size, "sha256": digest, "mtime_ns": st.st_mtime_ns}
    try:
        _write_json(sidecar_path(path), info)
    except OSError:
        _remove(sidecar_path(path) + ".tmp")
    return info


def _read_record(path: str) -> dict | None:
    """The sidecar record of ``path``, or ``None`` when it is missing or not a record."""
    try:
        with open(sidecar_path(path), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    ok = (isinstance(info, dict) and type(info.get("size")) is int and type(info.get("mtime_ns")) is int
          and isinstance(info.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", info["sha256"]))
    return info if ok else None


def verify_cached(path: str | os.PathLike, size: int | None = None, sha256: str | None = None, *,
                  fix: str = "download it again", hint: str = "") -> str:
    """Checks a cached file against its pins (``size``, ``sha256``) and its sidecar record; returns ``path``.

    The size is always checked; the file is hashed only when it has no record yet (the record is
    then written) or its mtime differs from the recorded one. Raises ``DownloadError`` naming the
    file and the fix.
    """
    path = os.fspath(path)
    st = os.stat(path)
    rec = _read_record(path)

    def fail(why: str):
        raise DownloadError(f"cached {path} {why}. Delete it and {sidecar_path(path)} to {fix}. {hint}".rstrip())

    if size is not None and st.st_size != size:
        fail(f"has {st.st_size} bytes, expected {size}")
    if rec is not None:
        if st.st_size != rec["size"]:
            fail(f"has {st.st_size} bytes but had {rec['size']} when it was stored: it changed since (cut off or "
                 "overwritten)")
        if sha256 is not None and rec["sha256"] != sha256:
            fail(f"was stored with sha256 {rec['sha256']}, but the expected sha256 is {sha256}")
        if st.st_mtime_ns == rec["mtime_ns"]:
            return path
        digest = sha256_of(path)
        if digest != rec["sha256"]:
            fail(f"changed since it was stored: its sha256 is {digest}, recorded {rec['sha256']}")
        record(path, digest)  # same bytes, touched: remember the new mtime
        return path
    if sha256 is None and not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        return path  # a read-only cache without a record: nothing to compare a hash with
    digest = sha256_of(path)
    if sha256 is not None and digest != sha256:
        fail(f"has sha256 {digest}, expected {sha256}: it is not the expected file, or it is corrupt")
    record(path, digest)
    return path


# -- HTTP ------------------------------------------------------------------------------------------------------------

def _by_hand(remote: Remote, dest: str) -> str:
    return (f"To install it by hand, download {remote.url} on a machine with network access and copy it to "
            f"{dest} (or set FEDTRAIN_DATA_DIR / cache_dir to the folder holding {remote.filename}).")


def _verify(path: str, remote: Remote, expected_size: int | None) -> str:
    """Size and sha256 of a finished ``.partial`` against the pins; returns its sha256."""
    size = os.path.getsize(path)
    want = remote.size if remote.size is not None else expected_size
    if want is not None and size != want:
        raise DownloadError(f"{remote.url}: got {size} bytes, expected {want}.")
    digest = sha256_of(path)
    if remote.sha256 is not None and digest != remote.sha256:
        raise DownloadError(f"{remote.url}: sha256 {digest} does not match the expected {remote.sha256}; "
                            "the file on the server changed or was corrupted in transit.")
    return digest


def _progress(enabled: bool):
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), transient=True, disable=not enabled)


class _Restart(Exception):
    """The server's answer to a resume cannot be appended to the partial file: start over."""


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None] | None:
    """``(first, last, total)`` of a ``Content-Range`` header (``None`` parts for ``*``); ``None`` if malformed."""
    m = _CONTENT_RANGE.match(value or "")
    if m is None:
        return None
    first, last, total = m.groups()
    return (int(first) if first else None, int(last) if last else None,
            int(total) if total and total != "*" else None)


def _validators(headers) -> dict:
    return {"etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified")}


def _if_range(state: dict) -> str | None:
    """The validator to send in ``If-Range``: a strong ETag, else Last-Modified (weak ETags cannot be used)."""
    etag = state.get("etag")
    if isinstance(etag, str) and etag and not etag.startswith("W/"):
        return etag
    modified = state.get("last_modified")
    return modified if isinstance(modified, str) and modified else None


def _resume_point(remote: Remote, partial: str, state_path: str) -> tuple[int, dict | None]:
    """``(offset, state)`` to resume from, or ``(0, None)`` after discarding a partial file that cannot resume."""
    offset = os.path.getsize(partial) if os.path.exists(partial) else 0
    state = None
    if offset:
        try:
            with open(state_path, encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, ValueError):
            state = None
    if (offset and isinstance(state, dict) and state.get("url") == remote.url and _if_range(state)
            and (remote.size is None or offset <= remote.size)):
        return offset, state
    _remove(partial, state_path)  # nothing to resume safely from: no validator, another URL, or too long
    return 0, None


def _transfer(remote: Remote, partial: str, state_path: str, offset: int, state: dict | None, *,
              progress: bool, timeout: float) -> int | None:
    """One HTTP request; appends to (or rewrites) ``partial``. Returns the expected total size, if known."""
    dest = partial[: -len(".partial")]
    request = urllib.request.Request(remote.url, headers={"User-Agent": "fedtrain"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
        request.add_header("If-Range", _if_range(state))
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left to send: fine only if the file is exactly this long
            parsed = _content_range(err.headers.get("Content-Range"))
            err.close()
            if parsed is not None and parsed[2] == offset:
                return offset
            raise _Restart(f"the server refused bytes={offset}- (HTTP 416, Content-Range "
                           f"{err.headers.get('Content-Range')!r})") from None
        raise DownloadError(f"could not download {remote.url}: HTTP {err.code} {err.reason}. "
                            f"{_by_hand(remote, dest)}") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"could not download {remote.url} ({reason}); no network? "
                            f"{_by_hand(remote, dest)}") from err
    with response:
        headers = response.headers
        total = None
        if response.status == 206 and offset:
            parsed = _content_range(headers.get("Content-Range"))
            if parsed is None or parsed[0] != offset:
                raise _Restart(f"asked for bytes from {offset}, the server sent Content-Range "
                               f"{headers.get('Content-Range')!r}")
            now = _validators(headers)
            for key in ("etag", "last_modified"):
                if now[key] is not None and state.get(key) is not None and now[key] != state[key]:
                    raise _Restart(f"the file on the server changed since the download started ({key} "
                                   f"{now[key]!r}, was {state[key]!r})")
            total = parsed[2]
            mode = "ab"
        elif response.status == 200:  # a fresh download, or the server chose to send it all again
            offset, mode = 0, "wb"
            _write_json(state_path, {"url": remote.url, **_validators(headers)})
        else:
            raise DownloadError(f"could not download {remote.url}: unexpected HTTP {response.status} "
                                f"{response.reason}. {_by_hand(remote, dest)}")
        length = headers.get("Content-Length")
        length = int(length) if length is not None and length.strip().isdigit() else None
        expected = offset + length if length is not None else total
        if total is None and response.status == 200:
            total = expected
        resumable = mode == "ab" or _if_range(_validators(headers)) is not None
        again = f"call again to resume from {partial}" if resumable else (
            "call again to download it again (the server sends no ETag or Last-Modified, so a download cannot "
            "resume)")
        received = offset
        try:
            with open(partial, mode) as f, _progress(progress) as bar:
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
                                f"({type(err).__name__}); {again}.") from err
        for want in (expected, total):
            if want is not None and received < want:
                raise DownloadError(f"connection to {remote.url} dropped after {received} of {want} bytes; "
                                    f"{again}.")
        if expected is None and not getattr(response, "chunked", False) and remote.size is None \
                and remote.sha256 is None:
            _remove(partial, state_path)
            raise DownloadError(f"{remote.url}: the server sent no Content-Length, so a cut-off transfer cannot be "
                                f"told from a complete one, and {remote.filename} has no pinned size or sha256; the "
                                f"download was deleted. {_by_hand(remote, dest)}")
        return total


def download(remote: Remote, cache_dir: str | os.PathLike | None = None, *, progress: bool = True,
             timeout: float = 60.0) -> str:
    """Path of ``remote`` in the cache, downloading it first if needed (resuming a ``.partial``).

    A cached file is checked against the pins and its sidecar record (``verify_cached``).
    """
    folder = data_dir(cache_dir)
    dest = os.path.join(folder, remote.filename)
    if os.path.exists(dest):
        return verify_cached(dest, remote.size, remote.sha256, hint=_by_hand(remote, dest))
    partial = dest + ".partial"
    state_path = partial + ".json"
    offset, state = _resume_point(remote, partial, state_path)
    try:
        expected = _transfer(remote, partial, state_path, offset, state, progress=progress, timeout=timeout)
    except _Restart:  # what the server sent cannot extend the partial file: discard it and start over
        _remove(partial, state_path)
        expected = _transfer(remote, partial, state_path, 0, None, progress=progress, timeout=timeout)
    try:
        digest = _verify(partial, remote, expected)
    except DownloadError as err:
        _remove(partial, state_path)
        raise DownloadError(f"{err} The partial download was deleted; call again to retry. "
                            f"{_by_hand(remote, dest)}") from None
    os.replace(partial, dest)
    _remove(state_path)
    record(dest, digest)
    return dest


def _copy_hashed(src, partial: str) -> str:
    """Copies the file object ``src`` to ``partial``; returns the sha256 of what was written."""
    h = hashlib.sha256()
    with open(partial, "wb") as out:
        for block in iter(lambda: src.read(CHUNK), b""):
            h.update(block)
            out.write(block)
    return h.hexdigest()


def lzma_decompress(path: str, dest: str | None = None) -> str:
    """Decompresses ``path`` (``.lzma``/``.xz``) next to it, atomically; reuses an existing result (checked
    against its sidecar record)."""
    dest = dest or path.rsplit(".", 1)[0]
    if os.path.exists(dest):
        return verify_cached(dest, fix=f"decompress {path} again")
    partial = dest + ".partial"
    try:
        with lzma.open(path) as src:
            digest = _copy_hashed(src, partial)
    except (lzma.LZMAError, EOFError) as err:
        _remove(partial)
        raise DownloadError(f"{path} is not a valid lzma file ({err}); delete it and download it again.") from err
    os.replace(partial, dest)
    record(dest, digest)
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
        return verify_cached(dest, fix=f"extract it from {archive} again")
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
            with tar.extractfile(info) as src:
                digest = _copy_hashed(src, partial)
    except (tarfile.TarError, EOFError, OSError) as err:
        _remove(partial)
        raise DownloadError(f"{archive} is not a readable tar archive ({err}); delete it and download it "
                            "again.") from err
    os.replace(partial, dest)
    record(dest, digest)
    return dest


def fetch_lzma(remote: Remote, cache_dir=None, *, progress: bool = True) -> str:
    """The decompressed file of an ``.lzma`` download (reused if already decompressed in the cache)."""
    dest = os.path.join(data_dir(cache_dir), remote.filename.rsplit(".", 1)[0])
    if os.path.exists(dest):
        return verify_cached(dest, fix=f"decompress {remote.filename} again (downloading it if needed)")
    return lzma_decompress(download(remote, cache_dir, progress=progress), dest)


def fetch_member(remote: Remote, member: str, cache_dir=None, *, progress: bool = True) -> str:
    """One file of a tar download (reused if already extracted in the cache)."""
    _check_member_name(member)
    dest = os.path.join(data_dir(cache_dir), member)
    if os.path.exists(dest):
        return verify_cached(dest, fix=f"extract it from {remote.filename} again (downloading it if needed)")
    return extract_member(download(remote, cache_dir, progress=progress), member, dest)
