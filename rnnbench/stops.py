"""Why a run ended: the trainer writes it, the ledger summary, the report and the budget
sensitivity read it. ``converged``: patience ran out (stores written before it was named say
``early_stopping``); a cap: ``max_steps`` or ``epochs`` came first; ``pruned`` by the pruner."""

from __future__ import annotations

CONVERGED = "converged"
CONVERGED_REASONS = (CONVERGED, "early_stopping")  # the name now, and the one older stores wrote
CAP_REASONS = ("max_steps", "epochs")


def normalized(reason: str | None) -> str | None:
    """The reason as this rnnbench names it (an older store's ``early_stopping`` is ``converged``)."""
    return CONVERGED if reason in CONVERGED_REASONS else reason
