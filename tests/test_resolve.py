"""Dataset resolution: explicit path -> $RNNBENCH_DATA -> cache -> download (sha256, atomic)."""

from __future__ import annotations

import hashlib
import http.server
import importlib
import os
import threading
from functools import partial
from pathlib import Path

import pytest

from rnnbench.data.resolve import DataFile, cache_dir, resolve
from rnnbench.errors import DataError

RELPATH = "charlm/demo/corpus.txt"
PAYLOAD = b"to be, or not to be\n" * 500
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
# The package re-exports the function `resolve`, which shadows the module of the same name.
resolve_module = importlib.import_module("rnnbench.data.resolve")


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """Empty data root and cache, selected through the environment; downloads still forbidden."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    cache.mkdir()
    monkeypatch.setenv("RNNBENCH_DATA", str(data))
    monkeypatch.setenv("RNNBENCH_CACHE", str(cache))
    monkeypatch.setenv("RNNBENCH_OFFLINE", "1")
    return data, cache


@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/served; yields its base URL."""
    served = tmp_path / "served"
    (served / "charlm/demo").mkdir(parents=True)
    (served / RELPATH).write_bytes(PAYLOAD)

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def place(root: Path, content: bytes = b"x") -> Path:
    path = root / RELPATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def leftovers(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()]


def test_explicit_path_wins_over_everything(roots, tmp_path):
    data, cache = roots
    place(data)
    place(cache)
    explicit = tmp_path / "mine.txt"
    explicit.write_text("mine")
    assert resolve(DataFile(RELPATH), explicit) == explicit
    assert resolve(DataFile(RELPATH), str(explicit)) == explicit


def test_missing_explicit_path_is_an_error_even_when_others_exist(roots, tmp_path):
    data, _ = roots
    place(data)
    with pytest.raises(DataError, match="does not exist") as info:
        resolve(DataFile(RELPATH), tmp_path / "nope.txt")
    assert "nope.txt" in str(info.value)


def test_data_root_comes_before_the_cache(roots):
    data, cache = roots
    in_cache = place(cache)
    assert resolve(DataFile(RELPATH)) == in_cache  # nothing under RNNBENCH_DATA yet
    in_data = place(data)
    assert resolve(DataFile(RELPATH)) == in_data


def test_cache_comes_before_download(roots, monkeypatch):
    _, cache = roots
    monkeypatch.setenv("RNNBENCH_OFFLINE", "0")
    in_cache = place(cache, PAYLOAD)
    # An unreachable URL proves no download is attempted when the cache has the file.
    unreachable = DataFile(RELPATH, PAYLOAD_SHA256, "http://127.0.0.1:9/never")
    assert resolve(unreachable) == in_cache


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RNNBENCH_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RNNBENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "rnnbench"


def test_download_lands_atomically_in_the_cache(roots, server, monkeypatch):
    data, cache = roots
    monkeypatch.setenv("RNNBENCH_OFFLINE", "0")
    renames = []
    real_replace = os.replace

    def spying_replace(src, dst):
        # At the rename the whole, checked file sits beside a target that does not exist yet.
        renames.append((Path(src), Path(dst)))
        assert Path(src).parent == Path(dst).parent and not Path(dst).exists()
        assert Path(src).read_bytes() == PAYLOAD
        real_replace(src, dst)

    monkeypatch.setattr(resolve_module.os, "replace", spying_replace)
    path = resolve(DataFile(RELPATH, PAYLOAD_SHA256, f"{server}/{RELPATH}"))
    assert path == cache / RELPATH and path.read_bytes() == PAYLOAD
    assert len(renames) == 1 and renames[0][1] == path
    assert leftovers(cache) == [path]  # no partial file left behind
    assert leftovers(data) == []


def test_wrong_sha256_raises_and_keeps_nothing(roots, server, monkeypatch):
    _, cache = roots
    monkeypatch.setenv("RNNBENCH_OFFLINE", "0")
    wrong = DataFile(RELPATH, "0" * 64, f"{server}/{RELPATH}")
    with pytest.raises(DataError, match="sha256 mismatch") as info:
        resolve(wrong)
    assert PAYLOAD_SHA256 in str(info.value)
    assert leftovers(cache) == []


def test_unreachable_download_is_a_data_error(roots, server, monkeypatch):
    _, cache = roots
    monkeypatch.setenv("RNNBENCH_OFFLINE", "0")
    with pytest.raises(DataError, match="could not download"):
        resolve(DataFile(RELPATH, PAYLOAD_SHA256, f"{server}/missing.txt"))
    assert leftovers(cache) == []


def test_offline_and_missing_names_the_file_and_where_to_put_it(roots, server):
    data, cache = roots
    with pytest.raises(DataError) as info:
        resolve(DataFile(RELPATH, PAYLOAD_SHA256, f"{server}/{RELPATH}"))
    message = str(info.value)
    assert RELPATH in message and "downloads are disabled" in message
    assert "$RNNBENCH_DATA/" + RELPATH in message and str(data) in message
    assert str(cache / RELPATH) in message
    assert leftovers(cache) == []


def test_missing_without_a_source_says_so(roots, monkeypatch):
    monkeypatch.setenv("RNNBENCH_OFFLINE", "0")
    with pytest.raises(DataError, match="no download source"):
        resolve(DataFile(RELPATH))


def test_explicit_offline_argument_overrides_the_environment(roots, server, monkeypatch):
    _, cache = roots
    monkeypatch.setenv("RNNBENCH_OFFLINE", "0")
    with pytest.raises(DataError, match="downloads are disabled"):
        resolve(DataFile(RELPATH, PAYLOAD_SHA256, f"{server}/{RELPATH}"), offline=True)
    monkeypatch.setenv("RNNBENCH_OFFLINE", "1")
    assert resolve(DataFile(RELPATH, PAYLOAD_SHA256, f"{server}/{RELPATH}"), offline=False) == cache / RELPATH


def test_file_url_downloads_too(roots, tmp_path, monkeypatch):
    _, cache = roots
    monkeypatch.setenv("RNNBENCH_OFFLINE", "0")
    source = tmp_path / "elsewhere.txt"
    source.write_bytes(PAYLOAD)
    path = resolve(DataFile(RELPATH, PAYLOAD_SHA256, source.as_uri()))
    assert path == cache / RELPATH and path.read_bytes() == PAYLOAD


# -- local copies are checked against the manifest, once per (path, size, mtime) ----------------------
def test_local_copy_checked_once_then_remembered(roots, monkeypatch):
    data, cache = roots
    target = data / RELPATH
    target.parent.mkdir(parents=True)
    target.write_bytes(PAYLOAD)
    hashed = []
    real = resolve_module.sha256_of
    monkeypatch.setattr(resolve_module, "sha256_of", lambda path: hashed.append(path) or real(path))
    file = DataFile(RELPATH, PAYLOAD_SHA256)
    assert resolve(file) == target and resolve(file) == target
    assert hashed == [target]  # the second resolve trusted the remembered (path, size, mtime)
    assert (cache / "checksums.json").is_file()


def test_one_changed_byte_is_an_error_naming_the_file_and_the_opt_out(roots, monkeypatch):
    data, _ = roots
    target = data / RELPATH
    target.parent.mkdir(parents=True)
    target.write_bytes(PAYLOAD)
    file = DataFile(RELPATH, PAYLOAD_SHA256)
    resolve(file)  # verified and remembered
    stat = target.stat()
    target.write_bytes(b"T" + PAYLOAD[1:])  # same size
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(DataError) as info:
        resolve(file)
    message = str(info.value)
    assert str(target) in message and "RNNBENCH_SKIP_CHECKSUM=1" in message and "\n" not in message
    monkeypatch.setenv("RNNBENCH_SKIP_CHECKSUM", "1")
    assert resolve(file) == target  # an edited copy, on purpose


def test_corrupt_cached_copy_is_refused_too(roots):
    _, cache = roots
    cached = cache / RELPATH
    cached.parent.mkdir(parents=True)
    cached.write_bytes(PAYLOAD[:-10])
    with pytest.raises(DataError, match="is not the published charlm/demo/corpus.txt"):
        resolve(DataFile(RELPATH, PAYLOAD_SHA256))
