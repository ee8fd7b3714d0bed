"""Stopping a run the way a person or a machine does: Ctrl-C (SIGINT) and SIGTERM (``kill``,
``timeout``, a batch scheduler's time limit) both interrupt it. The trial in progress is marked
``interrupted`` in the ledger and its configuration runs again on resume; nothing is orphaned."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def stop_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does (the default would kill the process at
    once, leaving its worker processes running on)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def stop_once_on_either() -> None:
    """For a worker process: the first SIGINT or SIGTERM raises KeyboardInterrupt, later ones are
    ignored, so the worker writes its interrupted trial to the ledger undisturbed (after Ctrl-C
    in a terminal it gets SIGINT from the terminal and SIGTERM from its parent). Also where the
    shell started the run in the background, which ignores SIGINT for it."""

    def stop(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then act on them as the handlers in force
    would have: a trial that finished training is recorded and counted before the run stops.
    Only the main thread can set handlers; elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.getsignal(s) for s in signals}
    for s in signals:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if caught:
            handler = before[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])
