"""Loopback ports for SSH forwards: free, distinct, and handed out one holder at a time."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from pytest_flightctl_device.devices.ports import free_loopback_port, port_reservation


@contextmanager
def bound(port: int) -> Iterator[socket.socket]:
    """Bind and listen on 127.0.0.1:port, as qemu's hostfwd does once the domain starts."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield sock
    finally:
        sock.close()


def test_reservation_is_a_bindable_loopback_port_and_creates_the_lock(tmp_path: Path) -> None:
    lock = tmp_path / ".ports.lock"
    with port_reservation(lock) as port, bound(port) as sock:
        assert 1024 < port < 65536
        assert sock.getsockname() == ("127.0.0.1", port)
        assert lock.exists()


def test_ports_in_use_are_not_handed_out(tmp_path: Path) -> None:
    with ExitStack() as stack:
        held = {stack.enter_context(bound(0)).getsockname()[1] for _ in range(50)}
        for _ in range(50):
            assert free_loopback_port() not in held
            with port_reservation(tmp_path / "lock") as port:
                assert port not in held


def test_the_lock_is_held_for_the_whole_block_across_threads(tmp_path: Path) -> None:
    lock = tmp_path / ".ports.lock"
    entered = threading.Event()
    second: list[int] = []

    def other() -> None:
        with port_reservation(lock) as port:
            second.append(port)
            entered.set()

    with ExitStack() as stack:
        with port_reservation(lock) as first:
            stack.enter_context(bound(first))  # stays bound after the block, as a started domain's port
            thread = threading.Thread(target=other, daemon=True)
            thread.start()
            assert not entered.wait(0.3), "a second reservation was handed out while the first was held"
        assert entered.wait(5), "the lock was not released at the end of the block"
        thread.join(5)
        assert second and second[0] != first


def test_the_lock_is_released_when_the_block_raises(tmp_path: Path) -> None:
    lock = tmp_path / ".ports.lock"
    try:
        with port_reservation(lock):
            raise RuntimeError("qemu failed to start")
    except RuntimeError:
        pass
    done = threading.Event()

    def again() -> None:
        with port_reservation(lock):
            done.set()

    threading.Thread(target=again, daemon=True).start()
    assert done.wait(5), "a failed block left the port lock held"


def test_many_threads_each_binding_inside_the_block_get_distinct_ports(tmp_path: Path) -> None:
    lock = tmp_path / ".ports.lock"
    sockets: list[socket.socket] = []
    guard = threading.Lock()

    def worker() -> None:
        with port_reservation(lock) as port:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", port))
            sock.listen()
            with guard:
                sockets.append(sock)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        ports = [sock.getsockname()[1] for sock in sockets]
        assert len(ports) == 16 and len(set(ports)) == 16
    finally:
        for sock in sockets:
            sock.close()


def test_processes_wait_for_each_other_and_get_distinct_ports(tmp_path: Path) -> None:
    """Two pytest-xdist workers: the second one's pick waits until the first has bound its port."""
    lock = tmp_path / ".ports.lock"
    child = textwrap.dedent(f"""
        import socket
        from pathlib import Path
        from pytest_flightctl_device.devices.ports import port_reservation
        with port_reservation(Path({str(lock)!r})) as port:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port))
                print(port, flush=True)
    """)
    with ExitStack() as stack:
        with port_reservation(lock) as first:
            stack.enter_context(bound(first))  # stays bound after the block, as a started domain's port
            proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
            stack.callback(proc.kill)  # a no-op once it has exited
            with suppress(subprocess.TimeoutExpired):
                proc.wait(0.5)
            assert proc.returncode is None, "the other process got a port while the lock was held"
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert int(out) != first
