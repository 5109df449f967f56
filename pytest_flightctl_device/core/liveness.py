"""Is that process still alive? A PID plus its kernel start time, safe against PID reuse.

Used by everything that must tell a dead writer's leftovers from a live one's: cache temps and
partials, the janitor's owner files, the accel verdict, the podman service sweep.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            stat = handle.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields restart after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])


@dataclass(frozen=True)
class Owner:
    """A process identity that survives PID reuse."""

    pid: int
    start: int

    @classmethod
    def current(cls) -> Owner:
        pid = os.getpid()
        return cls(pid, start_ticks(pid) or 0)

    def alive(self) -> bool:
        """True while the very process that wrote this identity still runs."""
        return start_ticks(self.pid) == self.start

    @property
    def token(self) -> str:
        """`PID-START`, for file names that must say who wrote them."""
        return f"{self.pid}-{self.start}"

    @classmethod
    def from_token(cls, token: str) -> Owner | None:
        pid, _, start = token.partition("-")
        if not (pid.isdigit() and start.isdigit()):
            return None
        return cls(int(pid), int(start))
