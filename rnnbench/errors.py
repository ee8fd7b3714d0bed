"""Errors a user can act on. The CLI prints their message on one line (no traceback unless --debug)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RnnbenchError(Exception):
    """Base of every error whose message is meant for the user."""

    exit_code = 1


class ConfigError(RnnbenchError):
    """Invalid experiment file, option or argument."""

    exit_code = 2


class UnknownNameError(ConfigError):
    """A cell, task, dataset or option name that is not registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        self.kind, self.name, self.known = kind, name, known
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        super().__init__(f"unknown {kind} {name!r}{hint} (known: {', '.join(known) or 'none'})")


class PluginError(RnnbenchError):
    """A plugin conflicts with another one or returned something unusable."""


class DataError(RnnbenchError):
    """A dataset file is missing, corrupt or malformed."""


class TrialFailed(RnnbenchError):
    """A training run ended without a usable score (NaN loss, out of memory, time limit...)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)
