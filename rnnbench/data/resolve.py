"""Find a dataset file: explicit path -> $RNNBENCH_DATA/<relpath> -> cache -> download.

Downloads are checked against their sha256 and written atomically (temp file + rename), so an
interrupted or corrupt download never leaves a half file in the cache. Files found in
``$RNNBENCH_DATA`` or the cache are checked against the same sha256 once, and again only when their
size or modification time changes (``checksums.json`` in the cache remembers the verdicts): an
edited copy is an error naming the file, unless ``RNNBENCH_SKIP_CHECKSUM=1`` says it is on purpose.
A file given explicitly (``data_path``) is the user's own and is not checked. Offline and missing gives
one message naming the file and where to put it. Tests never reach the network: set
``RNNBENCH_OFFLINE=1`` (the test suite does) to forbid downloads.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rnnbench.errors import DataError

DATA_ENV = "RNNBENCH_DATA"
CACHE_ENV = "RNNBENCH_CACHE"
OFFLINE_ENV = "RNNBENCH_OFFLINE"
SKIP_CHECKSUM_ENV = "RNNBENCH_SKIP_CHECKSUM"


@dataclass(frozen=True)
class DataFile:
    """One file of a dataset: where it sits under a data root, and where to download it from."""

    relpath: str  # e.g. "charlm/tinyshakespeare/input.txt", also its place in the cache
    sha256: str | None = None
    url: str | None = None


def cache_dir() -> Path:
    """``$RNNBENCH_CACHE``, else ``$XDG_CACHE_HOME/rnnbench``, else ``~/.cache/rnnbench``."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rnnbench"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve(file: DataFile, explicit: str | Path | None = None, *, offline: bool | None = None) -> Path:
    """Return a local path for ``file``, downloading it into the cache if allowed."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise DataError(f"data file {path} does not exist (given explicitly for {file.relpath})")
        return path
    if root := os.environ.get(DATA_ENV):
        path = Path(root).expanduser() / file.relpath
        if path.is_file():
            return verify(path, file)
    cached = cache_dir() / file.relpath
    if cached.is_file():
        return verify(cached, file)
    if offline is None:
        offline = os.environ.get(OFFLINE_ENV, "").lower() in ("1", "true", "yes")
    where = f"${DATA_ENV}/{file.relpath}" + (
        f" (${DATA_ENV}={os.environ[DATA_ENV]})" if DATA_ENV in os.environ else ""
    )
    if file.url is None or offline:
        reason = "downloads are disabled" if file.url else "it has no download source"
        raise DataError(f"dataset file {file.relpath} not found and {reason}: put it at {where} or {cached}")
    return download(file, cached)


def verify(path: Path, file: DataFile) -> Path:
    """``path`` if its sha256 is the manifest's; hashed once per (path, size, mtime), then remembered."""
    if file.sha256 is None or os.environ.get(SKIP_CHECKSUM_ENV, "").lower() in ("1", "true", "yes"):
        return path
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    known = _read_checksums()
    if known.get(key) != file.sha256:
        got = sha256_of(path)
        if got != file.sha256:
            raise DataError(
                f"{path} is not the published {file.relpath}: sha256 {got[:12]}…, expected "
                f"{file.sha256[:12]}… (a changed or truncated copy); restore the original, or set "
                f"{SKIP_CHECKSUM_ENV}=1 to use an edited copy on purpose"
            )
        known[key] = got
        _write_checksums(known)
    return path


def _checksum_file() -> Path:
    return cache_dir() / "checksums.json"


def _read_checksums() -> dict[str, str]:
    try:
        data = json.loads(_checksum_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_checksums(known: dict[str, str]) -> None:
    try:  # atomic: parallel workers may write at once; the last complete file wins
        stage_atomically(_checksum_file(), lambda tmp: tmp.write_text(json.dumps(known, indent=0)))
    except OSError:
        pass  # a read-only cache only costs a re-hash next time


def download(file: DataFile, target: Path) -> Path:
    """Download ``file.url`` to ``target`` atomically, checking the sha256 when one is known."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(file.url, timeout=60)
            except (urllib.error.URLError, OSError) as exc:
                raise DataError(f"could not download {file.relpath} from {file.url}: {exc}") from None
            with response:
                total = int(response.headers.get("Content-Length") or 0) or None
                _copy_with_progress(response, out, total, file.relpath)
        if file.sha256 is not None and (got := sha256_of(tmp)) != file.sha256:
            raise DataError(
                f"sha256 mismatch for {file.relpath} from {file.url}: expected {file.sha256}, got {got}; "
                "nothing was kept"
            )
        os.replace(tmp, target)
        return target
    finally:
        tmp.unlink(missing_ok=True)


def _copy_with_progress(src, dst, total: int | None, label: str) -> None:
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {label}", leave=False) as bar:
        while chunk := src.read(1 << 16):
            dst.write(chunk)
            bar.update(len(chunk))


def stage_atomically(target: Path, write) -> Path:
    """Write a derived cache file via ``write(tmp_path)`` then rename, so readers never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp_name))
        os.replace(tmp_name, target)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return target


__all__ = ["DataFile", "cache_dir", "download", "resolve", "sha256_of", "stage_atomically", "verify"]
