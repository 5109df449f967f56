"""Download progress: percent, MB/s and ETA, rate-limited so a log never floods.

Nothing is said for the first `delay` seconds (a fast download stays silent); after that one
report every `interval` seconds, and a closing line once the transfer ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Emit = Callable[[str], None]
MeterFactory = Callable[[str, "int | None"], "Meter"]


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < (1023.5 if unit == "B" else 1023.95) or unit == "GiB":  # "1024.0 KiB" is "1.0 MiB"
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _eta(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Meter:
    """Counts bytes of one transfer and reports to `emit` at most every `interval` seconds."""

    def __init__(self, label: str, total: int | None, emit: Emit | None, *, interval: float = 5.0,
                 delay: float = 2.0, bar: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.total = total
        self.emit = emit
        self.interval = interval
        self.delay = delay
        self.bar = bar
        self.clock = clock
        self.done = 0
        self._base = 0
        self._started = clock()
        self._next = self._started + delay
        self._reported = False

    def start(self, already: int = 0) -> None:
        """(Re)start counting at `already` bytes (a resumed transfer); the rate counts new bytes only."""
        self.done = already
        self._base = already
        self._started = self.clock()
        self._next = self._started + (self.interval if self._reported else self.delay)

    def advance(self, count: int) -> None:
        self.done += count
        if self.emit is not None and self.clock() >= self._next:
            self._next = self.clock() + self.interval
            self._reported = True
            self.emit(self.text())

    def rate(self) -> float:
        elapsed = max(self.clock() - self._started, 1e-6)
        return (self.done - self._base) / elapsed

    def text(self) -> str:
        rate = self.rate()
        parts = [f"{self.label}:"]
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            if self.bar:
                filled = int(fraction * 30)
                parts.append("[" + "#" * filled + "." * (30 - filled) + "]")
            parts.append(f"{fraction * 100:3.0f}% of {human_bytes(self.total)},")
        else:
            parts.append(f"{human_bytes(self.done)},")
        parts.append(f"{rate / 1e6:.1f} MB/s")
        if self.total and rate > 0:
            parts.append(f"ETA {_eta(max(self.total - self.done, 0) / rate)}")
        return " ".join(parts)

    def finish(self) -> None:
        """Say once that the transfer ended, if anything was said about it before."""
        if self.emit is not None and self._reported:
            elapsed = self.clock() - self._started
            self.emit(f"{self.label}: {human_bytes(self.done)} done in {elapsed:.1f} s "
                      f"({self.rate() / 1e6:.1f} MB/s)")
