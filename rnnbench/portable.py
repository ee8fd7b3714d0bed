"""What a logged or exported model needs to install on a machine that has never seen this checkout.

An rnnbench MLflow model is a pickle: loading it imports rnnbench and the plugin packages that
provide its cell and task. Those are often installed from a checkout (``pip install -e``) rather
than from a package index, so a requirement ``rnnbench==0.1.0`` installs nowhere else. Each such
distribution is built into a wheel (``pip wheel --no-deps``, once per version of its source: the
wheel is cached under the user's cache folder, a digest of the source files as its build tag),
the wheel travels inside the model, and requirements.txt names it by a path relative to the model folder,
which MLflow's ``virtualenv`` and ``uv`` environment managers resolve inside the model.
Everything installed from an index is pinned to the version that trained the model, without a
local version label (``torch==2.13.0``, never ``2.13.0+cpu``, which no public index serves).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote, urlparse

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from rnnbench.errors import DataError

CACHE_ENV = "RNNBENCH_WHEEL_CACHE"  # where built wheels are kept (default: ~/.cache/rnnbench/wheels)
_BUILD_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in")
_ALWAYS = ("rnnbench", "torch")  # the pickle needs both whatever its classes are


class PortabilityError(DataError):
    """A distribution the model needs can be neither pinned from an index nor built into a wheel."""


@dataclass
class Requirements:
    """requirements.txt lines, and the wheel files they name (to ship under the model's folder)."""

    lines: list[str] = field(default_factory=list)
    wheels: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be made portable, and why


def model_distributions(*objects) -> list[metadata.Distribution]:
    """rnnbench, torch, and every installed distribution that provides a class ``objects`` are
    made of (modules and their submodules, classes, instances), found from distribution metadata."""
    import torch

    tops = set(_ALWAYS)
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            items = [type(m) for m in obj.modules()]
        else:
            items = [obj if isinstance(obj, type) else type(obj)]
        tops.update(cls.__module__.split(".")[0] for cls in items)
    by_top = _packages_distributions()
    names = sorted({canonicalize_name(d) for top in tops for d in by_top.get(top, ())} - {"mlflow"})
    return [_distribution(n) for n in names]


def _distribution(name: str) -> metadata.Distribution:
    """The installed distribution ``name``: an installer's record (RECORD) before the bare
    ``<name>.egg-info`` a setuptools checkout keeps, which shadows it when the checkout's root
    is on sys.path (pytest's pythonpath, ``python -m`` from the root)."""
    found = list(metadata.distributions(name=name))
    if not found:
        raise metadata.PackageNotFoundError(name)
    return next((d for d in found if d.read_text("RECORD") is not None), found[0])


@lru_cache(maxsize=1)
def _packages_distributions() -> dict[str, list[str]]:
    """Top-level module -> distributions, read once per process (most of a second to read)."""
    return metadata.packages_distributions()


def requirements_for(*objects, wheel_dir: Path | None = None, strict: bool = True) -> Requirements:
    """What the model made of ``objects`` needs: each distribution installed from an index pinned
    (and its direct dependencies too, where it is shipped as a wheel), each one installed from a
    local folder built into a wheel named as ``<wheel_dir>/<file>`` (a path relative to the model).

    ``strict``: a wheel that cannot be built raises PortabilityError; otherwise the distribution
    is pinned by version (installable only where it is on an index) and ``notes`` says so."""
    out = Requirements()
    pins: dict[str, str] = {}
    shipped: list[metadata.Distribution] = []
    for dist in model_distributions(*objects):
        name = canonicalize_name(dist.metadata["Name"])
        origin = _direct_url(dist)
        try:
            wheel = _wheel_of(dist, origin)
        except Exception as exc:
            if strict and isinstance(exc, PortabilityError):
                raise
            error = exc if isinstance(exc, PortabilityError) else f"cannot ship {name} as a wheel ({exc!r})"
            if strict:
                raise PortabilityError(str(error)) from exc
            out.notes.append(
                f"{error}; pinned as {_pin(dist, origin)}, which installs only where an index has it"
            )
            wheel = None
        if wheel is None:
            pins[name] = _pin(dist, origin)
            continue
        shipped.append(dist)
        out.wheels.append(wheel)
        out.lines.append(f"{wheel_dir.as_posix()}/{wheel.name}" if wheel_dir else str(wheel))
    shipped_names = {canonicalize_name(d.metadata["Name"]) for d in shipped}
    for dist in shipped:  # the versions the model was trained with, not whatever is newest
        for dep in _direct_dependencies(dist):
            if dep not in shipped_names and dep not in pins and dep != "mlflow":
                try:
                    installed = _distribution(dep)
                except metadata.PackageNotFoundError:
                    continue
                pins[dep] = _pin(installed, _direct_url(installed))
    out.lines = sorted(pins.values()) + out.lines
    return out


def _pin(dist: metadata.Distribution, origin: dict | None) -> str:
    name = canonicalize_name(dist.metadata["Name"])
    if origin and "vcs_info" in origin:
        vcs = origin["vcs_info"]
        return f"{name} @ {vcs['vcs']}+{origin['url']}@{vcs.get('commit_id', '')}".rstrip("@")
    if origin and "archive_info" in origin and not origin["url"].startswith("file:"):
        return f"{name} @ {origin['url']}"
    return f"{name}=={_public(dist.version)}"


def _public(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``: a local version label names a build no public index serves."""
    try:
        return Version(version).public
    except InvalidVersion:
        return version.split("+", 1)[0]


def _direct_url(dist: metadata.Distribution) -> dict | None:
    """PEP 610 origin of an install from a URL or folder; None for one from a package index."""
    text = dist.read_text("direct_url.json")
    try:
        if text:
            return json.loads(text)
    except ValueError:
        return None
    root = Path(str(dist.locate_file("")))
    if dist.read_text("RECORD") is None and any((root / f).is_file() for f in _BUILD_FILES[:2]):
        return {"url": root.resolve().as_uri(), "dir_info": {}}  # metadata in a source tree
    return None


def _local_path(url: str) -> Path | None:
    parsed = urlparse(url)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else None


def _wheel_of(dist: metadata.Distribution, origin: dict | None) -> Path | None:
    """A wheel of ``dist`` when only this machine has it (installed from a folder or a local
    archive); None when an index or a URL serves it."""
    if not origin:
        return None
    path = _local_path(origin.get("url", ""))
    if path is None:
        return None
    if not path.exists():
        raise PortabilityError(
            f"{dist.metadata['Name']} was installed from {path}, which is gone: reinstall it "
            "to export a model that installs elsewhere"
        )
    if "archive_info" in origin:
        if path.suffix == ".whl":
            return path
        return _build_wheel(dist, path, _file_digest(path))  # an sdist: built like a folder
    if "dir_info" in origin:
        return _build_wheel(dist, path, _source_digest(dist, path))
    return None


def _direct_dependencies(dist: metadata.Distribution) -> list[str]:
    """Names of ``dist``'s requirements that apply here (no extras)."""
    names = []
    for line in dist.requires or []:
        try:
            req = Requirement(line)
        except ValueError:
            continue
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(canonicalize_name(req.name))
    return names


def _source_digest(dist: metadata.Distribution, root: Path) -> str:
    """sha256 over the build files under ``root`` and every file of the distribution's top-level
    packages: a changed source gets a new wheel, an unchanged one the cached wheel."""
    h = hashlib.sha256(f"{dist.metadata['Name']} {dist.version}".encode())
    files = [root / f for f in _BUILD_FILES if (root / f).is_file()]
    for top in _top_levels(dist):
        spec = importlib.util.find_spec(top)
        if spec is None:
            continue
        for loc in spec.submodule_search_locations or ([spec.origin] if spec.origin else []):
            p = Path(loc)
            files += [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        if "__pycache__" in f.parts or f.suffix in {".pyc", ".pyo"}:
            continue
        h.update(str(f).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _top_levels(dist: metadata.Distribution) -> list[str]:
    text = dist.read_text("top_level.txt")
    if text:
        return [t for t in text.split() if t]
    name = canonicalize_name(dist.metadata["Name"])
    return sorted(top for top, ds in _packages_distributions().items() if name in map(canonicalize_name, ds))


@lru_cache(maxsize=1)
def cache_dir() -> Path:
    """Where wheels are kept between runs: $RNNBENCH_WHEEL_CACHE, else ~/.cache/rnnbench/wheels,
    else (not writable) a folder of this process's that goes with it."""
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "rnnbench",
        "wheels",
    )
    try:
        Path(base).mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=base, prefix=".probe")
        probe.close()
        return Path(base)
    except OSError:
        import atexit

        tmp = tempfile.mkdtemp(prefix="rnnbench-wheels-")
        atexit.register(shutil.rmtree, tmp, True)
        return Path(tmp)


def _build_wheel(dist: metadata.Distribution, source: Path, digest: str) -> Path:
    """The cached wheel of ``source`` at ``digest``, built first if there is none. One build at a
    time per source (a file lock), in a private folder: the checkout gets no build/ or egg-info."""
    from filelock import FileLock

    name = re.sub(r"[^A-Za-z0-9_.]", "_", dist.metadata["Name"])
    slot = cache_dir() / f"{name}-{_public(dist.version)}-0{digest}"  # as the wheel's build tag
    with FileLock(str(slot) + ".lock"):
        if found := sorted(slot.glob("*.whl")):
            return found[0]
        with tempfile.TemporaryDirectory(prefix="rnnbench-wheel-") as tmp:
            tmp = Path(tmp)
            # setuptools reads DIST_EXTRA_CONFIG: build and egg-info folders outside the checkout
            (tmp / "setup.cfg").write_text(
                f"[build]\nbuild_base = {tmp / 'build'}\n[egg_info]\negg_base = {tmp}\n"
            )
            env = {**os.environ, "DIST_EXTRA_CONFIG": str(tmp / "setup.cfg"), "PIP_NO_INPUT": "1"}
            base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "out")]
            # the build backend installed here first (offline, fast); else pip's isolated build
            for extra in (["--no-build-isolation", "--no-index"], []):
                done = subprocess.run([*base, *extra, str(source)], env=env, capture_output=True, text=True)
                if done.returncode == 0:
                    break
            else:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                raise PortabilityError(
                    f"cannot build a wheel of {dist.metadata['Name']} from {source}: " + " | ".join(tail)
                )
            wheel = next((tmp / "out").glob("*.whl"))
            staging = Path(tempfile.mkdtemp(dir=slot.parent, prefix=f".{slot.name}."))
            shutil.copy2(wheel, staging / _tagged(wheel.name, digest))
            os.replace(staging, slot)
    _prune(slot.parent, f"{name}-")
    return next(slot.glob("*.whl"))


def _prune(cache: Path, prefix: str, keep: int = 8, age_s: float = 3600.0) -> None:
    """Drop all but the ``keep`` newest wheels of one distribution (each edit of a checkout makes
    one); never one younger than ``age_s``, which another process may be copying into a model."""
    import time

    slots = sorted((p for p in cache.glob(f"{prefix}*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in slots[:-keep]:
        if time.time() - old.stat().st_mtime > age_s:
            shutil.rmtree(old, ignore_errors=True)
            Path(str(old) + ".lock").unlink(missing_ok=True)


def _tagged(filename: str, digest: str) -> str:
    """``rnnbench-0.1.0-py3-none-any.whl`` -> ``rnnbench-0.1.0-0<digest>-py3-none-any.whl``: the
    source digest as the wheel's build tag (which must start with a digit). MLflow keys the
    environments it builds by the text of requirements.txt, so a model whose code changed but
    whose version did not must name a different file, or it is served by the old code."""
    parts = filename[: -len(".whl")].split("-")
    if len(parts) != 5:  # it has a build tag already
        return filename
    return "-".join([*parts[:2], f"0{digest}", *parts[2:]]) + ".whl"
