"""SIGINT/SIGTERM during training: finish the current step, write a checkpoint and return; a second SIGINT
aborts at once. In a distributed run the ranks agree on a signal at the end of a step (trainer.reduce), so
that every rank stops after the same step."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable


class StopSignals:
    """The signal a run got: ``received`` stops the loop after this step; ``pending`` is one this rank got
    in a distributed run, not yet agreed on by every rank."""

    def __init__(self):
        self.received: str | None = None
        self.pending: str | None = None

    def install(self, distributed: bool) -> Callable[[], None]:
        """Handle SIGINT and SIGTERM until the returned function restores the previous handlers."""
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        self.pending = None

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if (self.received is not None or self.pending is not None) and signum == signal.SIGINT:
                raise KeyboardInterrupt
            if distributed:
                self.pending = name      # the ranks agree on it at the end of the step
            else:
                self.received = name

        for s in previous:
            signal.signal(s, handler)

        def restore():
            for s, h in previous.items():
                signal.signal(s, h)
        return restore

    def agree(self) -> None:
        """Some rank got a signal: every rank stops after this step."""
        if self.received is None:
            self.received = self.pending or "SIGTERM"
