"""Downloads against a real HTTP server on 127.0.0.1: success, cache reuse, bad checksum, drop, resume, offline."""

import hashlib
import http.server
import os
import threading

import pytest

from fedtrain.data.download import DownloadError, Remote, data_dir, download

PAYLOAD = bytes(range(256)) * 4000  # ~1 MB


class Handler(http.server.BaseHTTPRequestHandler):
    drop_after = None  # bytes to send before closing the connection
    hits: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).hits.append((self.path, self.headers.get("Range")))
        if self.path != "/file.bin":
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).drop_after is not None:
            self.wfile.write(body[: type(self).drop_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    Handler.drop_after, Handler.hits = None, []
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


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_success_and_cache_reuse(server, tmp_path):
    path = download(remote(server), tmp_path, progress=False)
    assert read(path) == PAYLOAD and path == os.path.join(tmp_path, "file.bin")
    assert not os.path.exists(path + ".partial")
    assert download(remote(server), tmp_path, progress=False) == path
    assert len(Handler.hits) == 1  # served from the cache the second time


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
    assert Handler.hits[-1] == ("/file.bin", "bytes=300000-")
    assert not os.path.exists(path + ".partial")


def test_complete_partial_is_finished_with_416(server, tmp_path):
    (tmp_path / "file.bin.partial").write_bytes(PAYLOAD)
    assert read(download(remote(server), tmp_path, progress=False)) == PAYLOAD


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
    with pytest.raises(DownloadError, match="delete it to download it again"):
        download(remote(server), tmp_path, progress=False)


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
    assert not (tmp_path.parent / "escape").exists() and sorted(os.listdir(out)) == ["data.h5"]
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
