"""Errors a user can act on. The CLI prints their message on one line (no traceback unless --debug)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any

# An echoed value is cut to this many characters; a whole message to MESSAGE_LIMIT. A 10 MB column
# name or option value must not become a 10 MB error line.
VALUE_LIMIT = 80
MESSAGE_LIMIT = 1000
_LONG_WORD = re.compile(r"\S{201,}")


def shorten(value: Any, limit: int = VALUE_LIMIT) -> str:
    """``repr(value)`` for a message, cut in the middle when longer than ``limit`` characters."""
    text = repr(value)
    if len(text) <= limit:
        return text
    head, tail = limit * 2 // 3, limit // 3
    return f"{text[:head]}…{text[-tail:]} ({len(text):,} characters)"


def clip_message(message: str) -> str:
    """Cut overlong words (a value echoed by code that did not shorten it) and an overlong message."""
    message = _LONG_WORD.sub(lambda m: f"{m[0][:120]}…{m[0][-40:]} ({len(m[0]):,} characters)", message)
    if len(message) > MESSAGE_LIMIT:
        message = f"{message[:700]} …[{len(message) - 900:,} characters cut]… {message[-200:]}"
    return message


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (a database driver's own message where
    SQLAlchemy wraps one), or its type's name when it has none; for one-line warnings."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


class RnnbenchError(Exception):
    """Base of every error whose message is meant for the user."""

    exit_code = 1

    def __str__(self) -> str:
        return clip_message(super().__str__())


class ConfigError(RnnbenchError):
    """Invalid experiment file, option or argument."""

    exit_code = 2


class UnknownNameError(ConfigError):
    """A cell, task, dataset or option name that is not registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        self.kind, self.name, self.known = kind, name, known
        close = difflib.get_close_matches(str(name)[:200], known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        super().__init__(f"unknown {kind} {shorten(name)}{hint} (known: {', '.join(known) or 'none'})")


class PluginError(RnnbenchError):
    """A plugin conflicts with another one or returned something unusable."""


class NameClashError(PluginError):
    """Two plugins (or a plugin and a builtin) register one cell or task name: an experiment that
    uses the name cannot say which it means, so it is refused (exit code 2); others still run."""

    exit_code = 2


class ContractError(PluginError):
    """A plugin's cell or task breaks a rule of the Cell or Task contract (found by the pre-flight
    check, before anything runs): bad input to ``rnnbench run``, so exit code 2."""

    exit_code = 2


class DataError(RnnbenchError):
    """A dataset file is missing, corrupt or malformed (bad input: exit code 2)."""

    exit_code = 2


class LedgerUnreachable(RnnbenchError):
    """The ledger's database server stopped answering mid-run: a condition to name, not a bug and not
    bad input (exit code 1). Finished trials are in the ledger; the next run resumes."""

    def __init__(self, where: str, detail: str):
        super().__init__(
            f"{where} is unreachable ({detail}): start it and run the same command again; "
            "finished trials are kept"
        )


class TrialFailed(RnnbenchError):
    """A training run ended without a usable score (NaN loss, out of memory, time limit...)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)
