"""Stopping a run the way a person or a machine does: Ctrl-C (SIGINT) and SIGTERM (``kill``,
``timeout``, a batch scheduler's time limit) both interrupt it. The trial in progress is marked
``interrupted`` in the ledger and its configuration runs again on resume; nothing is orphaned."""

from __future__ import annotations

import signal


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
