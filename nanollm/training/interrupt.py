"""Graceful stops: the first SIGINT or SIGTERM becomes a request the training loop honours between steps.

The loop (nanollm/training/loop.py) polls `GracefulStop.signum`, saves a checkpoint and raises
`TrainingInterrupted`; what exit status that becomes is the stage's decision.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from nanollm.errors import NanollmError


class TrainingInterrupted(NanollmError):
    """Training stopped on a signal after saving a checkpoint at `step`."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum
        name = signal.Signals(signum).name
        super().__init__(f"training stopped by {name} after step {step}; its checkpoint was saved; run again to resume")


class GracefulStop:
    """Within `with GracefulStop() as stop:`, SIGINT/SIGTERM set `stop.signum` instead of killing the process.

    The handler only records the signal and puts the previous handlers back, so a second
    Ctrl-C (or SIGTERM) acts at once, as it would without us: a stuck save can still be
    aborted. Signal handlers can only be installed from the main thread; elsewhere this is
    a no-op and signals keep their usual effect.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
