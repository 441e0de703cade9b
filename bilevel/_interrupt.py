"""Ctrl-C during a long run: stop cleanly after the current step instead of losing it.

:func:`bilevel.solve` and the hyper-parameter tuners run many steps, each of
which updates the state in place.  A ``KeyboardInterrupt`` raised in the middle
of a step would leave a half-updated state (and the run's result would be lost
with the exception).  While a run is in progress, :class:`StopRequest` turns the
first SIGINT into a request that the loop reads between steps: the run ends
after the step in progress, and returns its result, whose state resumes the run
exactly.  A second SIGINT interrupts at once, as usual.

The handler is installed only in the main thread, only where Python's own
default handler is in place (a handler set by the user or a framework is left
alone; a Jupyter kernel restores the default one while a cell runs, so its
Interrupt button acts like Ctrl-C here), and only by the outermost run: a
``solve`` nested in another run's step (in a callback, an objective, or a
tuner's training loss) installs nothing and runs to its end, so the step in
progress is not cut short, and the second Ctrl-C still interrupts at once.  In
a child process that inherited the handler (a forked data-loader worker) the
signal is ignored: the main process decides.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Optional

_active = 0
"""Runs in progress in the main thread (a nested run installs no handler of its own)."""


class StopRequest:
    """Context manager: ``requested`` becomes ``True`` at the first Ctrl-C (SIGINT).

    Example:
        >>> with StopRequest() as stop:
        ...     for step in range(3):
        ...         if stop.requested:
        ...             break
        >>> stop.requested
        False
    """

    def __init__(self, name: str = "bilevel") -> None:
        self.name = name
        self.requested = False
        self._previous: Optional[Any] = None
        self._counted = False
        self._pid = -1

    def __enter__(self) -> "StopRequest":
        global _active
        if threading.current_thread() is not threading.main_thread():
            return self
        _active += 1
        self._counted = True
        try:
            if _active == 1 and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._pid = os.getpid()
                self._previous = signal.signal(signal.SIGINT, self._handle)
        except (ValueError, OSError):  # no signals here (e.g. an embedded interpreter)
            self._previous = None
        except BaseException:  # a Ctrl-C right here: leave the count as it was
            self.__exit__(None, None, None)
            raise
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked child (data-loader worker): the main process decides
            return
        self.requested = True
        self._restore()  # a second Ctrl-C interrupts at once
        print(f"\n{self.name}: stopping after the current step (Ctrl-C again to interrupt at once).",
              file=sys.stderr, flush=True)

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None  # only once given back: else a stale handler would swallow Ctrl-C

    def __exit__(self, *exc_info) -> None:
        global _active
        try:
            self._restore()
        finally:
            if self._counted:
                self._counted = False
                _active -= 1


__all__ = ["StopRequest"]
