"""Optuna: storages, samplers, pruners, and the ledger's reads and writes.

The Optuna storage is the ledger: the single record of what was tried and what it scored. A
finished trial's whole result (status, failure reason, hyperparameters, metrics, per-epoch
history, artifacts) is written as one ``record`` user attribute *before* the trial is told, so a
trial in a finished state always carries its record, and the state change is the one step that
makes it count. Everything else (MLflow, the CLI table, the report) is derived from it.

Trial statuses, derived from the ledger alone (:func:`trial_status`):

- ``complete`` / ``pruned`` / ``failed``: counted toward the budget (each is a configuration tried);
- ``interrupted``: stopped by Ctrl-C; not counted, its exact configuration is queued again;
- ``lost``: failed by recovery because its worker's lease expired (killed, OOM, machine gone),
  or told FAIL without a record; not counted and queued again, at most ``max_retries`` times
  per configuration; after that it counts as failed with reason ``worker_lost``.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
import warnings
import weakref
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from filelock import FileLock
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from rnnbench.errors import ConfigError, RnnbenchError, first_line
from rnnbench.experiment import BudgetSpec, CategoricalParam, Experiment, FloatParam, IntParam

optuna.logging.set_verbosity(optuna.logging.WARNING)
# rnnbench asks and tells and renews heartbeats itself (scheduler.Lease): these do not apply.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

FINAL_SUFFIX = "::final"
RECORD = "record"  # user attribute holding a finished trial's whole result
HISTORY_Z = "history_zlib"  # a record's history, compressed (zlib, base64) where it is long
HISTORY_PACK_BYTES = 64 * 1024
RETRY_OF = "retry_of"  # user attribute of a queued copy: the number of the trial it replaces
RETRIES = "retries"  # user attribute: how many lost workers this configuration has already cost
# user attribute written by recovery before it fails a lost trial: "retry" (queued again, not
# counted) or "counted" (its retries are spent: failed, worker_lost). Decided once, with the
# --max-retries of that moment, so a later start with another limit never re-judges it.
LOST_DECISION = "lost_decision"
# failures of a final seed that say nothing about its configuration (a neighbouring worker took
# the GPU's memory, the worker died): the seed is trained again, within the retry limit
TRANSIENT_REASONS = ("out_of_memory", "worker_lost")
LEGACY_INTERRUPTED = "interrupted"  # ledgers written before the record existed
COUNTED = ("complete", "pruned", "failed")
DEFAULT_MAX_RETRIES = 3


class StoreError(RnnbenchError):
    """A store (Optuna storage, MLflow tracking) that cannot be used as given."""

    exit_code = 2


# ---------------------------------------------------------------------------- storages


def is_journal(url: str | None) -> bool:
    return url is None or url.startswith("journal:") or "://" not in url


def journal_path(url: str | None, home: Path) -> Path:
    return Path(url.removeprefix("journal:")).expanduser().resolve() if url else home / "optuna.journal"


def normalize_rdb_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (SQLAlchemy's default driver is psycopg2)."""
    scheme = url.split("://", 1)[0]
    if scheme in ("postgresql", "postgres"):
        try:
            import psycopg2  # noqa: F401

            return "postgresql://" + url.split("://", 1)[1]
        except ImportError:
            return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def check_storage_url(url: str | None) -> None:
    """Refuse what cannot work, before anything is opened or written."""
    if is_journal(url):
        return
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    if scheme == "sqlite":
        raise StoreError(
            "SQLite is not safe for parallel Optuna workers: use the default journal file "
            "(--storage PATH) or PostgreSQL (--storage postgresql://user:password@host/db)"
        )
    if scheme not in ("postgresql", "postgres", "mysql"):
        raise StoreError(
            f"unknown storage scheme {scheme!r}: use a journal file path or postgresql://user:password@host/db"
        )
    if scheme in ("postgresql", "postgres"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            try:
                import psycopg2  # noqa: F401
            except ImportError:
                raise StoreError(
                    "PostgreSQL storage needs psycopg 3: pip install 'rnnbench[postgres]'"
                ) from None


def open_storage(url: str | None, home: Path, *, lease_seconds: float | None = None):
    """The journal file (processes on one machine) or an RDB (PostgreSQL, many machines).

    Unreachable databases, bad credentials and unusable files give one StoreError line."""
    check_storage_url(url)
    if is_journal(url):
        path = journal_path(url, home)
        try:
            if path.is_file() and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
                # archived results on read-only storage: readable as they are (no repair, no lock)
                return optuna.storages.JournalStorage(
                    JournalFileBackend(str(path), lock_obj=ReadOnlyJournal(path))
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            repair_journal(path)
            return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalLock(path)))
        except OSError as exc:
            raise StoreError(f"Optuna journal {path} is not usable: {exc.strerror or exc}") from None
        except (ValueError, json.JSONDecodeError) as exc:
            raise StoreError(
                f"Optuna journal {path} is damaged ({exc}); restore it from a backup or start a new run home"
            ) from None
    lease = lease_seconds or lease_duration()
    try:
        # Machines starting together would race to create Optuna's tables: one at a time.
        with _schema_lock(normalize_rdb_url(url)):
            # Heartbeats in the database's own clock: a worker on another machine judges a lease
            # without trusting our clock. No failed-trial callback: rnnbench requeues lost trials
            # itself, idempotently (see scheduler.recover).
            return RDBStorage(
                normalize_rdb_url(url),
                engine_kwargs={"pool_pre_ping": True},
                heartbeat_interval=max(1, int(lease / 4)),
                grace_period=max(2, int(lease)),
            )
    except StoreError:
        raise
    except Exception as exc:  # connection refused, bad password, unknown database...
        raise StoreError(f"Optuna storage {_redact(url)} is not reachable: {first_line(exc)}") from None


@contextmanager
def _schema_lock(url: str):
    """A PostgreSQL advisory lock around schema creation (other databases: no lock)."""
    if not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy  # local: +0.27 s on `import rnnbench.sweep`; only PostgreSQL needs it

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(7202611)"))  # rnnbench's schema key
            try:
                yield
            finally:
                try:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(7202611)"))
                except sqlalchemy.exc.OperationalError:
                    pass  # the session is gone (terminated, timed out): so is its lock
    finally:
        engine.dispose()


LEASE_ENV = "RNNBENCH_LEASE_SECONDS"
LEASE_RANGE = (1, 86400)  # below a second renewals cannot keep up; a day already outlives any fault


def lease_duration() -> float:
    """Seconds a claim stays valid without renewal (renewed every quarter of it)."""
    text = os.environ.get(LEASE_ENV, "60")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    low, high = LEASE_RANGE
    if not low <= seconds <= high:  # also refuses nan
        raise ConfigError(f"{LEASE_ENV}={text[:40]!r}: expected a number of seconds from {low} to {high}")
    return seconds


def database_location(url: str) -> str:
    """``host:port/database`` of an RDB URL, for messages (no scheme, user or password)."""
    return url.split("://", 1)[-1].rsplit("@", 1)[-1]


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


from optuna.storages.journal._file import BaseJournalFileLock  # noqa: E402  (public as a base only)


class JournalLock(BaseJournalFileLock):
    """The journal's write lock: a kernel lock (flock), which is dropped the moment its holder
    dies, where Optuna's default symlink lock makes everyone wait 30 s after a SIGKILL. Whoever
    takes it first cuts a torn last record a killed writer left, so no append lands on one."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = FileLock(str(self.path) + ".flock")

    def acquire(self) -> bool:
        self._lock.acquire()
        try:
            _cut_torn_tail(self.path)
        except BaseException:
            self._lock.release()
            raise
        return True

    def release(self) -> None:
        self._lock.release()


class ReadOnlyJournal(BaseJournalFileLock):
    """The lock of a journal this process cannot write: reading needs no lock, and a write is one
    line saying why it cannot happen."""

    def __init__(self, path: Path):
        self.path = path

    def acquire(self) -> bool:
        raise StoreError(f"Optuna journal {self.path} is read-only here: it can be read, not written")

    def release(self) -> None:
        pass


def _cut_torn_tail(path: Path) -> int:
    """Under the journal lock: cut a half-written last record; returns the bytes cut."""
    try:
        f = open(path, "rb+")
    except FileNotFoundError:
        return 0
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        keep = _last_good_offset(f, size)
        if keep != size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return size - keep


def repair_journal(path: Path) -> str | None:
    """Cut a half-written last record (a crash or a full disk) before anything is appended.

    Optuna skips such a line when reading, but the next append would glue a new record onto it
    and make the whole file unreadable. Runs under the journal's lock. Returns the warning
    printed, if any. A damaged record *inside* the file is not guessed at: ValueError."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    lock = JournalLock(path)
    lock._lock.acquire()  # not lock.acquire(): that would cut the tail silently
    try:
        cut = _cut_torn_tail(path)
    finally:
        lock.release()
    if not cut:
        return None
    message = f"warning: {path}: cut a half-written last record ({cut} bytes) left by a crash"
    print(message, flush=True)
    return message


def _last_good_offset(f, size: int) -> int:
    """Offset after the last complete, parseable record; trailing partial or garbled lines go
    (e.g. NUL bytes after a crash). A record may be any size: lines are found by scanning back to
    the previous newline, however far."""
    f.seek(size - 1)
    end = size if f.read(1) == b"\n" else _line_start(f, size)
    while end > 0:
        start = _line_start(f, end - 1)
        f.seek(start)
        try:
            json.loads(f.read(end - start))
            return end
        except ValueError:
            end = start
    if size > 1 << 20:  # a large file with no record at all is not a journal torn at its end
        raise ValueError("it holds no complete record")
    return 0


def _line_start(f, pos: int, block: int = 1 << 16) -> int:
    """Offset just after the last newline before ``pos`` (0 if there is none), read backwards in
    blocks."""
    while pos > 0:
        low = max(0, pos - block)
        f.seek(low)
        found = f.read(pos - low).rfind(b"\n")
        if found >= 0:
            return low + found + 1
        pos = low
    return 0


# ---------------------------------------------------------------------------- samplers, pruners


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler without its end-of-grid ``study.stop()``, which raises outside ``optimize``
    (rnnbench asks and tells); the trial budget already stops at the number of grid points."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


SPAN = 0.8  # share of each searched range the first points of the QMC design reach
SPAN_POINTS = 4  # ... within this many points: a scrambled Sobol prefix of 2^2 has one per quarter
SEED_CANDIDATES = 4096


def make_sampler(experiment: Experiment, trials_so_far: int = 0) -> optuna.samplers.BaseSampler:
    """The experiment's sampler, rebuilt for each ask. Random and TPE draws are seeded from the
    study's trial count: each ask draws a fresh point (a sampler rebuilt with a fixed seed proposes
    its first point again every time), a resumed run proposes what an uninterrupted one would, and
    every architecture starts from the same points. Claims are serialised by the ledger lock, so
    the trial count alone makes the seed unique. The QMC design needs no count: trial n takes
    point n of one sequence (see :class:`_QMCDesign`)."""
    spec = experiment.sampler
    seed = spec.seed + trials_so_far
    if spec.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.name == "grid":
        space = {k: p.choices for k, p in experiment.search.items() if isinstance(p, CategoricalParam)}
        # one seed for every ask and worker: it shuffles the grid, and trial n takes point n of it
        return _AskTellGridSampler(space, seed=spec.seed)
    if spec.name == "qmc":
        return _QMCDesign(experiment)
    if spec.startup == "random" or not spec.startup_trials:
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials)
    # TPE's own start-up is random: the design draws the first startup_trials, TPE the rest
    return _Startup(_QMCDesign(experiment), optuna.samplers.TPESampler(seed=seed, n_startup_trials=0),
                    spec.startup_trials)  # fmt: skip


def point_index(trials: list[FrozenTrial], number: int) -> int:
    """Which new configuration trial ``number`` is: the trials before it that were sampled (not
    queued copies of a lost or interrupted one); a copy is its original's configuration."""
    by_number = {t.number: t for t in trials}
    while (t := by_number.get(number)) is not None and t.user_attrs.get(RETRY_OF) is not None:
        number = t.user_attrs[RETRY_OF]
    return sum(1 for t in trials if t.number < number and t.user_attrs.get(RETRY_OF) is None)


def search_distributions(experiment: Experiment) -> dict[str, optuna.distributions.BaseDistribution]:
    """The searched parameters as Optuna distributions (what :func:`suggest` asks), by name;
    one-valued ones are left out (Optuna takes them as they are)."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for name, p in sorted(experiment.search.items()):
        if isinstance(p, IntParam):
            dist = optuna.distributions.IntDistribution(p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, FloatParam):
            dist = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log)
        else:
            dist = optuna.distributions.CategoricalDistribution(p.choices)
        if not dist.single():
            out[name] = dist
    return out


@functools.lru_cache(maxsize=64)
def design_seed(seed: int, dims: int) -> int:
    """The scramble seed of the QMC design: the first of a list of candidates drawn from
    ``seed`` whose first SPAN_POINTS points reach SPAN of every one of ``dims`` ranges (then any
    budget of that many trials or more spans them: more points only widen the span). Scrambled
    Sobol alone guarantees one point per quarter, not the outer tenths: for 2 parameters and 6
    trials, seeds 0..99 span 80% of the first range in 63 and of both in 35. With many parameters
    and no candidate reaching it in SPAN_POINTS, the one that does in the fewest points."""
    from scipy.stats import qmc  # local: +1.3 s on `import rnnbench.sweep`, which `run --dry-run` pays

    if dims == 0:
        return seed
    best, best_points = seed, math.inf
    for j in range(SEED_CANDIDATES):
        candidate = int(np.random.SeedSequence([seed, j]).generate_state(1)[0])
        x = qmc.Sobol(dims, scramble=True, seed=candidate).random(16)
        span = np.maximum.accumulate(x) - np.minimum.accumulate(x)
        reached = np.flatnonzero((span >= SPAN).all(axis=1))
        points = reached[0] + 1 if len(reached) else math.inf
        if points < best_points:
            best, best_points = candidate, points
        if points <= SPAN_POINTS:
            break
    return best


class _QMCDesign(optuna.samplers.QMCSampler):
    """Scrambled Sobol in which the study's n-th new configuration is point n of the sequence,
    derived from the ledger's trials on every ask. Optuna's own QMCSampler counts its draws in a
    study attribute instead: it draws the first trial at random (no space inferred yet), and its
    count is not atomic; here a sampler rebuilt per ask, another process or a resumed run
    proposes the same point, and a queued copy keeps its original's. One scramble seed for every
    architecture (:func:`design_seed`): every study proposes the same points (paired)."""

    def __init__(self, experiment: Experiment):
        self._space = search_distributions(experiment)
        with warnings.catch_warnings():  # QMCSampler is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(
                qmc_type="sobol",
                scramble=True,
                seed=design_seed(experiment.sampler.seed, len(self._space)),
                warn_independent_sampling=False,
            )
        self._index = 0

    def infer_relative_search_space(self, study, trial):
        return dict(self._space)

    def sample_relative(self, study, trial, search_space):
        self._index = point_index(study.get_trials(deepcopy=False), trial.number)
        # points are asked one at a time, never a prefix of 2^k at once: scipy's warning does not apply
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The balance properties of Sobol")
            return super().sample_relative(study, trial, search_space)

    def _find_sample_id(self, study, search_space) -> int:
        return self._index


class _Startup(optuna.samplers.BaseSampler):
    """``first`` for a study's first ``trials`` new configurations, ``then`` after them."""

    def __init__(self, first, then, trials: int):
        self._first, self._then, self._trials = first, then, trials
        self._picked: dict[tuple[int, int], optuna.samplers.BaseSampler] = {}

    def _pick(self, study, trial):
        # asked five times a trial; the answer is fixed by the trials before it, which never change
        key = (study._study_id, trial.number)
        if key not in self._picked:
            early = point_index(study.get_trials(deepcopy=False), trial.number) < self._trials
            self._picked[key] = self._first if early else self._then
        return self._picked[key]

    def infer_relative_search_space(self, study, trial):
        return self._pick(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._pick(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._pick(study, trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._pick(study, trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._pick(study, trial).after_trial(study, trial, state, values)


def make_pruner(experiment: Experiment, budget: BudgetSpec | None = None) -> optuna.pruners.BasePruner:
    """Validations are reported as steps 1, 2, ... and Optuna may prune from step ==
    n_warmup_steps: the first prunable step is ``warmup_epochs + 1`` where that is given, else
    the first at which the trial has made ``min_fraction`` of the validations its budget allows."""
    spec, budget = experiment.pruner, budget or experiment.budget
    first = first_prunable_step(spec, budget)
    if spec.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=first)
    if spec.name == "hyperband":
        rounds = min(budget.validations() or budget.epochs, 10**6)
        return optuna.pruners.HyperbandPruner(min_resource=min(first, rounds), max_resource=rounds)
    return optuna.pruners.NopPruner()


def first_prunable_step(spec, budget: BudgetSpec) -> int:
    if spec.warmup_epochs is not None:
        return spec.warmup_epochs + 1
    rounds = budget.validations() or budget.epochs  # known wherever min_fraction passed validation
    return max(1, math.ceil(spec.min_fraction * rounds - 1e-9))  # 1e-9: 6 x 1/3 is 2, not 3


def trial_budget(experiment: Experiment, budget: BudgetSpec | None = None) -> int:
    """Trials per study (of ``budget``, default the experiment's); a grid has at most as many
    points as it has combinations, and an experiment that searches nothing has none (its one
    configuration goes to the final seeds)."""
    trials = (budget or experiment.budget).trials
    if not experiment.search:
        return 0
    if experiment.sampler.name == "grid":
        size = 1
        for p in experiment.search.values():
            size *= len(p.choices)
        return min(trials, size)
    return trials


def suggest(trial: optuna.Trial, experiment: Experiment) -> dict[str, Any]:
    params = {}
    for name, p in experiment.search.items():
        if isinstance(p, IntParam):
            params[name] = trial.suggest_int(name, p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, FloatParam):
            params[name] = trial.suggest_float(name, p.low, p.high, log=p.log)
        else:
            params[name] = trial.suggest_categorical(name, p.choices)
    return params


# ---------------------------------------------------------------------------- the ledger's reads


def record_of(t: FrozenTrial) -> dict[str, Any] | None:
    record = t.user_attrs.get(RECORD)
    if record is not None and HISTORY_Z in record:  # a long history, stored compressed
        record = {k: v for k, v in record.items() if k != HISTORY_Z} | {
            "history": unpack_history(record[HISTORY_Z])
        }
    return record


def pack_history(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with a history over :data:`HISTORY_PACK_BYTES` of JSON stored compressed: a
    record of any allowed length (10,000 validations of many metrics) stays a modest ledger entry."""
    text = json.dumps(record.get("history") or [], separators=(",", ":"))
    if len(text) <= HISTORY_PACK_BYTES:
        return record
    packed = base64.b64encode(zlib.compress(text.encode(), 9)).decode("ascii")
    return {k: v for k, v in record.items() if k != "history"} | {HISTORY_Z: packed}


def unpack_history(packed: str) -> list[dict[str, Any]]:
    return json.loads(_inflate(packed))  # a new list each time: callers may change it


@functools.lru_cache(maxsize=64)
def _inflate(packed: str) -> bytes:
    return zlib.decompress(base64.b64decode(packed))


def trial_status(t: FrozenTrial, max_retries: int = DEFAULT_MAX_RETRIES) -> str:
    """What a trial is, from the ledger alone (see the module docstring)."""
    if t.state == TrialState.COMPLETE:
        return "complete"
    if t.state == TrialState.PRUNED:
        return "pruned"
    if t.state == TrialState.RUNNING:
        return "running"
    if t.state == TrialState.WAITING:
        return "waiting"
    record = record_of(t)
    if t.user_attrs.get(LEGACY_INTERRUPTED) or (record and record.get("status") == "interrupted"):
        return "interrupted"
    if record and record.get("status") == "failed":
        # a final seed's transient failure (see retry_decision) is retried, like a lost one
        return "lost" if t.user_attrs.get(LOST_DECISION) == "retry" else "failed"
    decision = t.user_attrs.get(LOST_DECISION)
    if decision is not None:
        return "lost" if decision == "retry" else "failed"
    return "lost" if t.user_attrs.get(RETRIES, 0) < max_retries else "failed"  # ledgers from before


def failure_of(t: FrozenTrial, status: str) -> tuple[str | None, str | None]:
    """(reason, message) of a failed, lost or interrupted trial."""
    record = record_of(t) or {}
    if status in ("failed", "lost") and record.get("status") == "failed":
        return record.get("failure_reason"), record.get("failure_message")
    if status in ("lost", "failed"):
        return "worker_lost", "its worker stopped renewing its lease (killed, out of memory or machine lost)"
    if status == "interrupted":
        return "interrupted", "stopped by the user; its configuration was queued again"
    return None, None


def retry_decision(stage: str, reason: str, retries: int, max_retries: int) -> str | None:
    """The :data:`LOST_DECISION` a worker writes with a failed trial's record, before its tell:
    ``"retry"`` for a final seed's transient failure while retries are left, ``"counted"`` once
    they are spent; None for anything else (a search trial's failure, or a deterministic one such
    as a NaN loss or an exception, counts as failed at once)."""
    if stage != "final" or reason not in TRANSIENT_REASONS:
        return None
    return "retry" if retries < max_retries else "counted"


def needs_retry(status: str) -> bool:
    return status in ("lost", "interrupted")


def study_counts(trials: list[FrozenTrial], max_retries: int = DEFAULT_MAX_RETRIES) -> dict[str, int]:
    counts = dict.fromkeys(("complete", "pruned", "failed", "lost", "interrupted", "running", "waiting"), 0)
    for t in trials:
        counts[trial_status(t, max_retries)] += 1
    return counts


def counted(trials, max_retries: int = DEFAULT_MAX_RETRIES) -> tuple[int, int]:
    """(trials that count toward the budget, trials running or queued now)."""
    c = study_counts(trials, max_retries)
    return sum(c[k] for k in COUNTED), c["running"] + c["waiting"]


def best_trial(trials: list[FrozenTrial], direction: str) -> FrozenTrial | None:
    """The best complete trial (lowest number on ties, so every reader agrees)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not complete:
        return None
    sign = 1 if direction == "minimize" else -1
    return min(complete, key=lambda t: (sign * t.value, t.number))


def study_names(storage, experiment: str) -> list[str]:
    """Search-study names of an experiment in the ledger."""
    prefix = f"{experiment}/"
    return sorted(
        s.study_name
        for s in storage.get_all_studies()
        if s.study_name.startswith(prefix) and not s.study_name.endswith(FINAL_SUFFIX)
    )


# One trial cache per RDB storage. Optuna wraps an RDBStorage in a new _CachedStorage at every
# load_study, which then reads every trial of the study again (with its params, values and
# attributes: 7 statements, and a record each); one wrapper kept per storage reads only the trials
# that are new or unfinished since its last read. Finished trials never change (Optuna refuses to
# update them), and unfinished ones are read afresh every time: sharing it is what Optuna does for
# a study's whole life. It holds every trial the worker has read, as the journal does anyway.
# Measured: StudyLedger.load of a study of 80 finished trials 44 -> 6.4 ms; benchmarks/
# ledger_load.py at N = 1, 92 -> 77 statements a trial, claim p50 71-76 -> 62 ms.
_TRIAL_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def with_trial_cache(storage):
    """``storage`` as load_study should see it: an RDB behind the one trial cache kept for it."""
    if not isinstance(storage, RDBStorage):
        return storage
    cached = _TRIAL_CACHES.get(storage)
    if cached is None:  # two threads may both build one: either serves, the second is kept
        cached = _TRIAL_CACHES[storage] = optuna.storages._CachedStorage(storage)
    return cached


def load_study(storage, name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=with_trial_cache(storage))
    except KeyError:
        return None
