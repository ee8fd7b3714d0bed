"""Find a dataset file: explicit path -> $RNNBENCH_DATA/<relpath> -> cache -> download.

Downloads are checked against their sha256 and written atomically (temp file + rename), so an
interrupted or corrupt download never leaves a half file in the cache. Offline and missing gives
one message naming the file and where to put it. Tests never reach the network: set
``RNNBENCH_OFFLINE=1`` (the test suite does) to forbid downloads.
"""

from __future__ import annotations

import hashlib
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
            return path
    cached = cache_dir() / file.relpath
    if cached.is_file():
        return cached
    if offline is None:
        offline = os.environ.get(OFFLINE_ENV, "").lower() in ("1", "true", "yes")
    where = f"${DATA_ENV}/{file.relpath}" + (
        f" (${DATA_ENV}={os.environ[DATA_ENV]})" if DATA_ENV in os.environ else ""
    )
    if file.url is None or offline:
        reason = "downloads are disabled" if file.url else "it has no download source"
        raise DataError(f"dataset file {file.relpath} not found and {reason}: put it at {where} or {cached}")
    return download(file, cached)


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


__all__ = ["DataFile", "cache_dir", "download", "resolve", "sha256_of", "stage_atomically"]
