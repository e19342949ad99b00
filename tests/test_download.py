"""Downloads against a real HTTP server on 127.0.0.1: success, cache reuse, bad checksum, drop, resume, offline,
resumes across server versions, bad range answers, and cached files that change after they were stored."""

import hashlib
import http.server
import json
import lzma
import os
import threading

import pytest

from fedtrain.data import download as dl
from fedtrain.data.download import DownloadError, Remote, data_dir, download

PAYLOAD = bytes(range(256)) * 4000  # ~1 MB
V2 = bytes(reversed(range(256))) * 4000  # the same length, other bytes: the file after a server update


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``payload`` at /file.bin. Ranges are honoured when ``If-Range`` matches (or is absent), as
    RFC 9110 says; the class attributes make it misbehave in the ways tests need."""

    payload = PAYLOAD
    etag = '"v1"'
    last_modified = None
    drop_after = None  # bytes to send before closing the connection
    send_length = True  # False: no Content-Length, the body ends when the connection closes
    ignore_range = False  # answer every range request with 200 and the whole file
    ignore_if_range = False  # honour Range even when If-Range names another version
    range_shift = 0  # a 206 starts (and says it starts) this many bytes after the offset asked for
    hits: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        cls = type(self)
        cls.hits.append((self.path, self.headers.get("Range"), self.headers.get("If-Range")))
        if self.path != "/file.bin":
            self.send_error(404)
            return
        body, start = cls.payload, 0
        rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        current = if_range is None or if_range in (cls.etag, cls.last_modified)
        if rng and not cls.ignore_range and (current or cls.ignore_if_range):
            start = int(rng.split("=")[1].split("-")[0]) + cls.range_shift
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        data = body[start:]
        if cls.etag:
            self.send_header("ETag", cls.etag)
        if cls.last_modified:
            self.send_header("Last-Modified", cls.last_modified)
        if cls.send_length:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if cls.drop_after is not None:
            self.wfile.write(data[: cls.drop_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)


DEFAULTS = {k: getattr(Handler, k) for k in ("payload", "etag", "last_modified", "drop_after", "send_length",
                                             "ignore_range", "ignore_if_range", "range_shift")}


@pytest.fixture
def server():
    for k, v in DEFAULTS.items():
        setattr(Handler, k, v)
    Handler.hits = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def remote(base, **kw):
    kw.setdefault("size", len(PAYLOAD))
    kw.setdefault("sha256", hashlib.sha256(PAYLOAD).hexdigest())
    return Remote(f"{base}/file.bin", "file.bin", **kw)


def unpinned(base):
    return remote(base, size=None, sha256=None)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def interrupted(server, tmp_path, r, after=300_000):
    """Leaves ``file.bin.partial`` of ``after`` bytes, as a dropped connection does."""
    Handler.drop_after = after
    with pytest.raises(DownloadError, match="dropped after"):
        download(r, tmp_path, progress=False)
    assert os.path.getsize(tmp_path / "file.bin.partial") == after
    Handler.drop_after = None


def test_success_and_cache_reuse(server, tmp_path):
    path = download(remote(server), tmp_path, progress=False)
    assert read(path) == PAYLOAD and path == os.path.join(tmp_path, "file.bin")
    assert not os.path.exists(path + ".partial")
    assert download(remote(server), tmp_path, progress=False) == path
    assert len(Handler.hits) == 1  # served from the cache the second time
    with open(path + ".sha256") as f:
        rec = json.load(f)
    assert rec["size"] == len(PAYLOAD) and rec["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()
    assert sorted(os.listdir(tmp_path)) == ["file.bin", "file.bin.sha256"]  # no temporary or state files left


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    with pytest.raises(DownloadError, match="sha256 .* does not match"):
        download(remote(server, sha256="0" * 64), tmp_path, progress=False)
    assert os.listdir(tmp_path) == []
    with pytest.raises(DownloadError, match="expected 5"):
        download(remote(server, size=5, sha256=None), tmp_path, progress=False)
    assert os.listdir(tmp_path) == []


def test_dropped_connection_then_resume(server, tmp_path):
    Handler.drop_after = 300_000
    with pytest.raises(DownloadError, match="dropped after .*resume"):
        download(remote(server), tmp_path, progress=False)
    assert not os.path.exists(tmp_path / "file.bin")
    assert os.path.getsize(tmp_path / "file.bin.partial") == 300_000
    Handler.drop_after = None
    path = download(remote(server), tmp_path, progress=False)
    assert read(path) == PAYLOAD
    assert Handler.hits[-1] == ("/file.bin", "bytes=300000-", '"v1"')  # resumed, validated by the ETag
    assert not os.path.exists(path + ".partial") and not os.path.exists(path + ".partial.json")


def test_resume_with_last_modified_only(server, tmp_path):
    Handler.etag, Handler.last_modified = None, "Wed, 21 Oct 2015 07:28:00 GMT"
    interrupted(server, tmp_path, unpinned(server))
    assert read(download(unpinned(server), tmp_path, progress=False)) == PAYLOAD
    assert Handler.hits[-1] == ("/file.bin", "bytes=300000-", "Wed, 21 Oct 2015 07:28:00 GMT")


def test_complete_partial_is_finished_with_416(server, tmp_path):
    interrupted(server, tmp_path, remote(server))
    with open(tmp_path / "file.bin.partial", "ab") as f:  # the rest arrived, the rename did not happen
        f.write(PAYLOAD[300_000:])
    assert read(download(remote(server), tmp_path, progress=False)) == PAYLOAD
    assert Handler.hits[-1][1] == f"bytes={len(PAYLOAD)}-"


def test_partial_without_validator_is_not_resumed(server, tmp_path):
    """A server that sends neither ETag nor Last-Modified gives nothing to check a resume against: restart."""
    Handler.etag = None
    Handler.drop_after = 300_000
    with pytest.raises(DownloadError, match="cannot resume"):
        download(unpinned(server), tmp_path, progress=False)
    Handler.drop_after = None
    Handler.payload = V2  # the server's file changed meanwhile
    assert read(download(unpinned(server), tmp_path, progress=False)) == V2
    assert Handler.hits[-1][1] is None  # no Range: started over
    (tmp_path / "file.bin.partial").write_bytes(PAYLOAD[:1000])  # a partial from who knows where
    os.remove(tmp_path / "file.bin")
    assert read(download(unpinned(server), tmp_path, progress=False)) == V2
    assert Handler.hits[-1][1] is None


def test_resume_across_server_versions_restarts(server, tmp_path):
    """The file changed on the server between the drop and the resume: If-Range makes it send all of v2."""
    interrupted(server, tmp_path, unpinned(server))
    Handler.payload, Handler.etag = V2, '"v2"'
    assert read(download(unpinned(server), tmp_path, progress=False)) == V2  # not PAYLOAD[:300000] + V2[300000:]
    assert Handler.hits[-1] == ("/file.bin", "bytes=300000-", '"v1"')


def test_server_ignoring_if_range_is_not_spliced(server, tmp_path):
    """A server that honours Range but not If-Range: its 206 names the new ETag, so it is not appended."""
    interrupted(server, tmp_path, unpinned(server))
    Handler.payload, Handler.etag, Handler.ignore_if_range = V2, '"v2"', True
    assert read(download(unpinned(server), tmp_path, progress=False)) == V2
    assert [h[1] for h in Handler.hits[-2:]] == ["bytes=300000-", None]  # refused the 206, started over


def test_200_to_a_range_request_restarts(server, tmp_path):
    interrupted(server, tmp_path, unpinned(server))
    Handler.ignore_range = True
    path = download(unpinned(server), tmp_path, progress=False)
    assert read(path) == PAYLOAD and len(Handler.hits) == 2  # the whole body replaced the partial, once


@pytest.mark.parametrize("shift", [1000, -1000])
def test_206_from_another_offset_is_refused(server, tmp_path, shift):
    interrupted(server, tmp_path, unpinned(server))
    Handler.range_shift = shift
    assert read(download(unpinned(server), tmp_path, progress=False)) == PAYLOAD
    assert [h[1] for h in Handler.hits[-2:]] == ["bytes=300000-", None]


def test_transfer_cut_off_without_content_length(server, tmp_path):
    Handler.send_length, Handler.drop_after = False, 300_000
    with pytest.raises(DownloadError, match="no Content-Length.*no pinned size or sha256"):
        download(unpinned(server), tmp_path, progress=False)
    assert os.listdir(tmp_path) == []
    with pytest.raises(DownloadError, match="sha256 .* does not match"):  # a pinned file: its hash says so
        download(remote(server, size=None), tmp_path, progress=False)
    assert os.listdir(tmp_path) == []
    Handler.drop_after = None  # whole, but still without a length: only a pin can vouch for it
    assert read(download(remote(server, size=None), tmp_path, progress=False)) == PAYLOAD


def test_transfer_shorter_than_content_length(server, tmp_path):
    interrupted(server, tmp_path, unpinned(server))
    assert not os.path.exists(tmp_path / "file.bin")


def test_cached_file_changed_later_is_caught(server, tmp_path, monkeypatch):
    path = download(unpinned(server), tmp_path, progress=False)
    hashed = []
    real = dl.sha256_of
    monkeypatch.setattr(dl, "sha256_of", lambda p: hashed.append(p) or real(p))
    assert download(unpinned(server), tmp_path, progress=False) == path and hashed == []  # size check only
    stat = os.stat(path)
    with open(path, "r+b") as f:  # one byte changed, same size
        f.seek(12345)
        f.write(b"\x00" if PAYLOAD[12345] else b"\x01")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(DownloadError) as info:
        download(unpinned(server), tmp_path, progress=False)
    msg = str(info.value)
    assert f"cached {path} changed since it was stored" in msg and f"Delete it and {path}.sha256" in msg
    assert hashed == [path]
    with open(path, "r+b") as f:  # cut off: caught by the size alone
        f.truncate(1000)
    with pytest.raises(DownloadError, match="has 1000 bytes but had .* it changed since"):
        download(unpinned(server), tmp_path, progress=False)
    os.remove(path)  # the fix the message gives
    os.remove(path + ".sha256")
    assert read(download(unpinned(server), tmp_path, progress=False)) == PAYLOAD


def test_touched_but_unchanged_file_is_rehashed_once(server, tmp_path):
    path = download(remote(server), tmp_path, progress=False)
    os.utime(path, ns=(0, 10**18))
    assert download(remote(server), tmp_path, progress=False) == path
    with open(path + ".sha256") as f:
        assert json.load(f)["mtime_ns"] == 10**18


def test_file_placed_by_hand_is_checked_and_recorded(server, tmp_path):
    (tmp_path / "file.bin").write_bytes(V2)  # right size, wrong bytes
    with pytest.raises(DownloadError, match="has sha256 .*, expected .*Delete it"):
        download(remote(server), tmp_path, progress=False)
    (tmp_path / "file.bin").write_bytes(PAYLOAD)
    assert read(download(remote(server), tmp_path, progress=False)) == PAYLOAD and Handler.hits == []
    assert os.path.exists(tmp_path / "file.bin.sha256")


def test_offline_error_names_url_and_destination(tmp_path):
    r = Remote("http://127.0.0.1:9/nothing.sqlite", "nothing.sqlite")
    with pytest.raises(DownloadError) as info:
        download(r, tmp_path, progress=False, timeout=2)
    msg = str(info.value)
    assert r.url in msg and os.path.join(tmp_path, "nothing.sqlite") in msg and "by hand" in msg


def test_http_error_and_bad_cached_size(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(Remote(f"{server}/missing", "missing"), tmp_path, progress=False)
    (tmp_path / "file.bin").write_bytes(b"short")
    with pytest.raises(DownloadError, match="Delete it and .* to download it again"):
        download(remote(server), tmp_path, progress=False)


def test_decompressed_file_is_recorded_and_checked(tmp_path):
    from fedtrain.data.download import fetch_lzma
    with lzma.open(tmp_path / "d.sqlite.lzma", "wb") as f:
        f.write(PAYLOAD)
    r = Remote("http://127.0.0.1:9/d.sqlite.lzma", "d.sqlite.lzma")  # cached: never fetched
    path = fetch_lzma(r, tmp_path, progress=False)
    assert read(path) == PAYLOAD and os.path.exists(path + ".sha256")
    assert fetch_lzma(r, tmp_path, progress=False) == path
    with open(path, "ab") as f:
        f.write(b"x")
    with pytest.raises(DownloadError, match="d.sqlite has .* bytes but had .*decompress d.sqlite.lzma again"):
        fetch_lzma(r, tmp_path, progress=False)


def test_official_remotes_are_pinned_where_upstream_pins_them():
    from fedtrain.datasets import cifar100, emnist, shakespeare
    hexdigest = set("0123456789abcdef")
    pinned = [cifar100.TFF_SQLITE, cifar100.TFF_HDF5, *emnist.TFF_HDF5.values(),
              Remote(shakespeare.TFF_URL, "shakespeare.sqlite.lzma", shakespeare.TFF_SIZE, shakespeare.TFF_SHA256)]
    for r in pinned:
        assert r.sha256 and len(r.sha256) == 64 and set(r.sha256) <= hexdigest, r
    assert len({r.sha256 for r in pinned}) == len(pinned)
    assert cifar100.TFF_SQLITE.size == 153_019_920 and shakespeare.TFF_SIZE == 1_329_828


def test_data_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTRAIN_DATA_DIR", str(tmp_path / "cache"))
    assert data_dir() == str(tmp_path / "cache") and os.path.isdir(tmp_path / "cache")
    monkeypatch.delenv("FEDTRAIN_DATA_DIR")
    assert data_dir().endswith(os.path.join(".cache", "fedtrain"))


def _tar(path, members):
    """A .tar.bz2 of ``(TarInfo fields, data)`` members."""
    import io
    import tarfile
    with tarfile.open(path, "w:bz2") as tar:
        for fields, data in members:
            info = tarfile.TarInfo(fields.pop("name"))
            for k, v in fields.items():
                setattr(info, k, v)
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return str(path)


def test_extract_member_writes_only_dest_and_refuses_links(tmp_path):
    import tarfile

    from fedtrain.data.download import extract_member, fetch_member
    out = tmp_path / "cache"
    out.mkdir()
    # A member whose own path climbs out of the folder: only its bytes are copied, to dest.
    archive = _tar(tmp_path / "a.tar.bz2", [({"name": "../../escape/data.h5"}, b"payload")])
    dest = extract_member(archive, "data.h5", str(out / "data.h5"))
    with open(dest, "rb") as f:
        assert f.read() == b"payload"
    assert not (tmp_path.parent / "escape").exists() and sorted(os.listdir(out)) == ["data.h5", "data.h5.sha256"]
    # Links are refused, not followed (a symlink to /etc/passwd, a hard link to another member).
    for kind, target in ((tarfile.SYMTYPE, "/etc/passwd"), (tarfile.LNKTYPE, "other")):
        link = {"name": "d/data.h5", "type": kind, "linkname": target}
        archive = _tar(tmp_path / f"l{kind!r}.tar.bz2", [({"name": "other"}, b"x"), (link, b"")])
        with pytest.raises(DownloadError, match="not a regular file; it is not followed"):
            extract_member(archive, "data.h5", str(out / f"link{kind!r}.h5"))
        assert not os.path.exists(out / f"link{kind!r}.h5") and not os.path.exists(out / f"link{kind!r}.h5.partial")
    # The member name picks the cache file, so it cannot leave the cache folder.
    for bad in ("../x.h5", "/abs/x.h5", "a/../../x.h5", ""):
        with pytest.raises(ValueError, match="relative path without '..'"):
            fetch_member(Remote("http://127.0.0.1:9/a.tar.bz2", "a.tar.bz2"), bad, cache_dir=out, progress=False)
