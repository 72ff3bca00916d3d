"""A stop request from outside the run: SIGTERM or SIGINT (preemption, Ctrl-C).

The handler only sets a flag; the loop reads it once per optimiser step, saves a checkpoint and
returns, so a preempted run resumes where it stopped. A second signal stops at once.
"""

from __future__ import annotations

import signal


class StopRequest:
    """SIGTERM / SIGINT (preemption, Ctrl-C) set a flag; the loop checks it after each optimiser
    step, saves a checkpoint and returns (a second signal stops at once). With several processes the flag is max-reduced, so every
    rank stops at the same step even if only one got the signal."""

    def __init__(self):
        self.signal_name: str | None = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: signals stay with their current handlers
                pass

    def _handler(self, signum, frame):
        if self.signal_name is not None:  # a second signal: stop now, without the checkpoint
            self.restore()
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
