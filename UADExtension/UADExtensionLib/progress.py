"""Slice progress -> fraction, rate and ETA text (shared by the GUI and the console)."""

from __future__ import annotations

import time


def format_duration(seconds: float) -> str:
    """1:05:03, 4:07 or 0:09 style."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressTracker:
    """Feed it ``update(done, total)``; it estimates the time left.

    The rate is measured from the first report (usually ``done == 0`` or the
    first finished batch), so model loading and warm-up do not bias the ETA.
    """

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        self.start_time = self._clock()
        self._first = None  # (time, done) of the first report
        self.done = 0
        self.total = 0

    def update(self, done: int, total: int) -> None:
        now = self._clock()
        self.done, self.total = int(done), int(total)
        if self._first is None:
            self._first = (now, self.done)

    @property
    def elapsed(self) -> float:
        return self._clock() - self.start_time

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0

    @property
    def rate(self) -> float | None:
        """Slices per second since the first report; None until it can be measured."""
        if self._first is None:
            return None
        t0, d0 = self._first
        dt, dd = self._clock() - t0, self.done - d0
        if dt <= 0 or dd <= 0:
            return None
        return dd / dt

    @property
    def eta(self) -> float | None:
        """Seconds left, or None when unknown."""
        if self.total > 0 and self.done >= self.total:
            return 0.0
        r = self.rate
        if r is None:
            return None
        return (self.total - self.done) / r

    def text(self) -> str:
        """e.g. '37/155 slices, 2.4 slices/s, about 0:49 left'."""
        parts = [f"{self.done}/{self.total} slices"]
        r = self.rate
        if r is not None:
            parts.append(f"{r:.1f} slices/s" if r >= 1 else f"{1 / r:.1f} s/slice")
        eta = self.eta
        if eta is not None and self.done < self.total:
            parts.append(f"about {format_duration(eta)} left")
        return ", ".join(parts)
