"""Raw contender: qemu-system-x86_64 started by hand on the same image, the floor for the plugin.

Overlay, seed and key are made before the clock starts; the clock covers only qemu's start and
the guest's boot until the first `ssh ... true` succeeds with the plugin's own OpenSSH options.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from boot_common import ConsoleWatch, MachineCgroup, console_patterns, cpu_seconds, first_ssh_success

from pytest_flightctl_device.devices.agent import AgentFile
from pytest_flightctl_device.devices.boot import LOGIN_USER
from pytest_flightctl_device.devices.domain import create_overlay
from pytest_flightctl_device.devices.ports import free_loopback_port
from pytest_flightctl_device.devices.seed import SeedSpec, new_instance_id, ready_marker, write_seed_iso
from pytest_flightctl_device.devices.ssh import KeyPair, SshClient


def qemu_argv(*, memory_mib: int, vcpus: int, console: Path, port: int, mac: str, seed: Path,
              overlay: Path) -> list[str]:
    """The command line of the issue's raw boot (plus the seed's MAC, so network-config matches)."""
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", str(memory_mib), "-smp", str(vcpus),
        "-nographic", "-serial", f"file:{console}",
        "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", f"virtio-net-pci,netdev=n0,romfile=,mac={mac}",
        "-device", "virtio-scsi-pci",
        "-drive", f"if=none,id=cd,file={seed},media=cdrom,readonly=on", "-device", "scsi-cd,drive=cd",
        "-drive", f"file={overlay},if=virtio,format=qcow2",
    ]


class RawContender:
    """Hand-started qemu, placed in a CPU cgroup beside libvirt's domains (see MachineCgroup)."""

    name = "raw_qemu"

    def __init__(self, base: Path, keypair: KeyPair, files: tuple[AgentFile, ...], *, memory_mib: int,
                 vcpus: int, scratch: Path, timeout: float) -> None:
        self.base = base
        self.keypair = keypair
        self.files = files
        self.memory_mib = memory_mib
        self.vcpus = vcpus
        self.scratch = scratch
        self.timeout = timeout
        self.cgroup = MachineCgroup(f"fcbench-raw-{secrets.token_hex(4)}")
        self.placement = str(self.cgroup.path) if self.cgroup.path else "the benchmark's own cgroup"

    def round(self) -> dict[str, Any]:
        """One boot; returns ready_s, qemu's CPU time, and when the console showed the kernel and the end."""
        vm_dir = Path(tempfile.mkdtemp(prefix="raw-", dir=self.scratch))
        try:
            mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
            instance_id = new_instance_id()
            seed, overlay = vm_dir / "seed.iso", vm_dir / "overlay.qcow2"
            write_seed_iso(SeedSpec(instance_id=instance_id, hostname="raw-bench",
                                    authorized_key=self.keypair.public_line, files=self.files, mac=mac), seed)
            create_overlay(self.base, overlay)
            for _attempt in range(3):  # the port may be taken between the pick and qemu's bind
                result = self._boot(vm_dir, mac, instance_id)
                if result is not None:
                    return result
            raise RuntimeError("raw qemu could not bind a loopback port three times")
        finally:
            shutil.rmtree(vm_dir, ignore_errors=True)

    def _boot(self, vm_dir: Path, mac: str, instance_id: str) -> dict[str, Any] | None:
        """Start qemu (the clock starts here) and wait for ssh; None when the port was taken."""
        console, port = vm_dir / "console.log", free_loopback_port()
        console.unlink(missing_ok=True)
        ssh = SshClient(port=port, key=self.keypair.private_path, user=LOGIN_USER, state_dir=vm_dir)
        argv = qemu_argv(memory_mib=self.memory_mib, vcpus=self.vcpus, console=console, port=port, mac=mac,
                         seed=vm_dir / "seed.iso", overlay=vm_dir / "overlay.qcow2")
        t0 = time.monotonic()
        with open(vm_dir / "qemu.log", "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            placed = self.cgroup.add(proc.pid)
            watch = ConsoleWatch(lambda: console, console_patterns(ready_marker(instance_id)), t0,
                                 pid_of=lambda: proc.pid)
            watch.start()
            try:
                banner, ready = first_ssh_success(ssh.argv("true"), port, t0 + self.timeout,
                                                  lambda: proc.poll() is None)
            except RuntimeError:
                text = (vm_dir / "qemu.log").read_text(errors="replace")
                if "hostfwd" in text or "Address already in use" in text:
                    return None
                raise RuntimeError(f"raw qemu stopped: {text.strip()[-300:]}") from None
            finally:
                seen = watch.stop()
            return {"ready_s": round(ready - t0, 3), "banner_s": round(banner - t0, 3),
                    "qemu_cpu_s": cpu_seconds(proc.pid), "console": seen, "console_qemu_cpu_s": watch.cpu_seen,
                    "in_machine_cgroup": placed}
        finally:
            ssh.close()
            if proc.poll() is None:
                proc.kill()  # our own child, by its handle
            proc.wait()

    def close(self) -> None:
        self.cgroup.remove()
