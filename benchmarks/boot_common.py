"""Shared pieces of the boot benchmark: console watching, SSH readiness probing, statistics.

Kept apart from the contenders so that the raw-qemu and testcloud rounds are judged by exactly the
same readiness probe (the first `ssh ... true` that succeeds, with the plugin's OpenSSH options).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

FIRMWARE = re.compile(r"SeaBIOS|EFI v\d|BdsDxe")
KERNEL = re.compile(r"Linux version \d")
# Banner probe cadence: a fresh connection this often, each given this long before it is dropped.
PROBE_INTERVAL_S = 0.25
PROBE_PATIENCE_S = 5.0
MAX_PENDING = 20
CHECK_S = 0.02


def console_patterns(marker: str) -> dict[str, re.Pattern[str]]:
    """The console events every contender records: firmware, guest kernel, cloud-init's final message."""
    return {"firmware_output": FIRMWARE, "kernel_output": KERNEL, "ready_marker": re.compile(re.escape(marker))}


class ConsoleWatch(threading.Thread):
    """Timestamps (relative to t0) the first appearance of each pattern in a growing console file.

    Runs beside a contender and polls every 50 ms, so it tells when the guest printed something,
    independently of when the contender noticed it.
    """

    def __init__(self, path_of: Callable[[], Path | None], patterns: dict[str, re.Pattern[str]],
                 t0: float, interval: float = 0.05, pid_of: Callable[[], int | None] | None = None) -> None:
        super().__init__(daemon=True)
        self.path_of = path_of
        self.pid_of = pid_of
        self.cpu_seen: dict[str, float | None] = {}  # qemu's CPU seconds when each event was seen
        self.patterns = patterns
        self.t0 = t0
        self.interval = interval
        self.seen: dict[str, float] = {}
        self._stop_event = threading.Event()
        self._text = ""
        self._offset = 0
        self._inode: int | None = None

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._read()
            if len(self.seen) == len(self.patterns):
                return
            self._stop_event.wait(self.interval)

    def _read(self) -> None:
        path = self.path_of()
        if path is None:
            return
        try:
            with open(path, "rb") as handle:
                inode = os.fstat(handle.fileno()).st_ino
                if inode != self._inode:  # a new file (the contender recreated it): start over
                    self._inode, self._offset, self._text = inode, 0, ""
                handle.seek(self._offset)
                chunk = handle.read()
        except OSError:
            return
        now = time.monotonic() - self.t0
        self._offset += len(chunk)
        self._text += chunk.decode("utf-8", "replace")
        for name, pattern in self.patterns.items():
            if name not in self.seen and pattern.search(self._text):
                self.seen[name] = round(now, 3)
                if self.pid_of is not None:
                    pid = self.pid_of()
                    self.cpu_seen[name] = cpu_seconds(pid) if pid else None

    def stop(self) -> dict[str, float]:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=2)
        self._read()
        return dict(self.seen)


def wait_for_banner(port: int, deadline: float, alive: Callable[[], bool]) -> float:
    """Monotonic time the guest's SSH banner first arrives on 127.0.0.1:port.

    A fresh connection starts every PROBE_INTERVAL_S (none older is dropped before
    PROBE_PATIENCE_S): slirp accepts the host side at once and retries its SYN to a guest that is
    not up yet with growing back-off, so one long connection can wait seconds after sshd listens,
    while a fresh one gets through on its first SYN. Bare sockets cost the guest no key exchange.
    """
    pending: list[tuple[float, socket.socket]] = []
    next_start = 0.0
    try:
        while True:
            now = time.monotonic()
            for started, sock in list(pending):
                try:
                    data = sock.recv(64)
                except BlockingIOError:
                    if now - started <= PROBE_PATIENCE_S:
                        continue
                    data = b""
                except OSError:
                    data = b""
                if data.startswith(b"SSH-"):
                    return now
                sock.close()
                pending.remove((started, sock))
            if now > deadline:
                raise TimeoutError("no SSH banner within the boot timeout")
            if not alive():
                raise RuntimeError("the VM stopped before its SSH banner arrived")
            if now >= next_start and len(pending) < MAX_PENDING:
                with contextlib.suppress(OSError):
                    sock = socket.create_connection(("127.0.0.1", port), timeout=0.5)
                    sock.setblocking(False)
                    pending.append((now, sock))
                next_start = now + PROBE_INTERVAL_S
            time.sleep(CHECK_S)
    finally:
        for _started, sock in pending:
            sock.close()


def first_ssh_success(argv: list[str], port: int, deadline: float,
                      alive: Callable[[], bool]) -> tuple[float, float]:
    """Monotonic times at which the SSH banner arrived and `argv` (an `ssh ... true`) first exited 0.

    Attempts start once the banner is there (wait_for_banner) and run one at a time: parallel
    attempts would each make a slow TCG guest do a key exchange and slow it down further.
    """
    banner = wait_for_banner(port, deadline, alive)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no successful ssh within the boot timeout")
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=remaining,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise TimeoutError("no successful ssh within the boot timeout") from None
        if proc.returncode == 0:
            return banner, time.monotonic()
        if not alive():
            raise RuntimeError("the VM stopped before ssh succeeded")
        time.sleep(PROBE_INTERVAL_S)


def summary(samples: list[float]) -> dict[str, object]:
    """Median, spread and every sample (seconds, rounded to ms)."""
    if not samples:
        return {"median_s": None, "samples_s": []}
    return {"median_s": round(statistics.median(samples), 3), "min_s": round(min(samples), 3),
            "max_s": round(max(samples), 3), "samples_s": [round(s, 3) for s in samples]}


def phase_medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Median of each named timestamp over the rounds that recorded it."""
    names = sorted({name for r in rounds for name in r}, key=lambda n: statistics.median(
        [r[n] for r in rounds if n in r]))
    return {n: round(statistics.median([r[n] for r in rounds if n in r]), 3) for n in names}


def loadavg() -> list[float]:
    one, five, fifteen = os.getloadavg()
    return [round(one, 2), round(five, 2), round(fifteen, 2)]


def listening_addresses(port: int) -> list[str]:
    """Local addresses with a TCP listener on `port` (from /proc/net/tcp and tcp6)."""
    found: list[str] = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A = LISTEN
                continue
            found.append(_address(address, v6))
    return found


def _address(hex_address: str, v6: bool) -> str:
    raw = bytes.fromhex(hex_address)
    if not v6:
        return ".".join(str(b) for b in raw[::-1])
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
    import ipaddress

    return str(ipaddress.IPv6Address(b"".join(words)))


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far (all its threads), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def libvirt_qemu_pid(name: str) -> int | None:
    """The qemu PID of a running system-libvirt domain (from libvirt's pid file)."""
    try:
        return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


class MachineCgroup:
    """A CPU cgroup beside libvirt's domains, so a hand-started qemu is scheduled as they are.

    libvirt puts every domain under the `machine` CPU cgroup; under group scheduling all those VMs
    (other users' too) share that group's weight, while a process left in the root cgroup competes
    on its own. On a busy host that alone makes a hand-started qemu faster than any libvirt one.
    """

    ROOTS = (Path("/sys/fs/cgroup/cpu/machine"), Path("/sys/fs/cgroup/machine.slice"),
             Path("/sys/fs/cgroup/machine"))

    def __init__(self, name: str) -> None:
        self.path: Path | None = None
        for root in self.ROOTS:
            if (root / "cgroup.procs").exists():
                try:
                    (root / name).mkdir()
                except OSError:
                    continue
                self.path = root / name
                break

    def add(self, pid: int) -> bool:
        if self.path is None:
            return False
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
        except OSError:
            return False
        return True

    def remove(self) -> None:
        """Remove the (by then empty) cgroup; waits briefly for exiting tasks to leave it."""
        if self.path is None:
            return
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)
