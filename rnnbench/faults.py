"""Test-only fault injection (RNNBENCH_FAULT), at the points a kill or an error hurts most."""

from __future__ import annotations

import os
import signal


def fault(point: str) -> None:
    """Test-only fault injection: RNNBENCH_FAULT=<point>[:<once file>][,...] SIGKILLs this
    process at ``point`` (``mid_trial``: after a trial's first epoch; ``after_ledger_write``:
    between the ledger write and the MLflow write; ``sqlite_store_built``: before a new MLflow
    store is renamed into place); with a once file only the first process dies. A point whose
    name ends in ``_oom`` raises torch's out-of-memory error instead (``final_oom``: after a final
    seed's training), one ending in ``_sigterm`` sends this process SIGTERM (``record_sigterm``:
    after training, before its result is recorded), and one ending in ``_sigstop`` stops it until
    someone sends SIGCONT (``mid_trial_sigstop``: a worker stalled inside a trial, its lease
    renewals with it)."""
    for spec in filter(None, os.environ.get("RNNBENCH_FAULT", "").split(",")):
        name, _, once_file = spec.partition(":")
        if name != point:
            continue
        if once_file:  # only the first process to get here dies
            try:
                os.close(os.open(once_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        if name.endswith("_sigterm"):  # not SIGINT: a shell ignores that for a background job
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if name.endswith("_sigstop"):
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        if name.endswith("_oom"):
            import torch  # only here: this module is imported where torch is not

            raise torch.OutOfMemoryError("CUDA out of memory (injected by RNNBENCH_FAULT)")
        os.kill(os.getpid(), signal.SIGKILL)
