"""Ctrl-C around the few steps that must not be cut in half."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) until the block is done; it is raised right after.

    A Python-level handler that only records the signal, not a blocked signal mask: the
    kernel hands a process's signal to any thread that does not block it (torch's and
    arrow's pools), and Python runs handlers in the main thread whichever got it. Processes
    forked inside the block inherit the recording handler, so a Ctrl-C there is ignored
    too. Outside the main thread (no signal handlers there), a plain block.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if received:
            signal.raise_signal(signal.SIGINT)  # now, to the handler that was in place
