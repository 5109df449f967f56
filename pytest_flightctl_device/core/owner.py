"""Who owns a VM: a process identity that survives PID reuse (pid + kernel start time)."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _start_ticks(pid: int) -> int | None:
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
    pid: int
    start: int

    @classmethod
    def current(cls) -> Owner:
        pid = os.getpid()
        return cls(pid, _start_ticks(pid) or 0)

    def alive(self) -> bool:
        """True while the very process that made the VM still runs."""
        return _start_ticks(self.pid) == self.start
