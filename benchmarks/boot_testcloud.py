"""testcloud contender (PyPI `testcloud`): create-to-ready of the same image, through its own API.

Three honest adjustments, applied to testcloud's objects before its XML is generated (nothing in
testcloud's code is changed):

- TCG: testcloud picks KVM whenever /dev/kvm exists, and KVM hangs a nested guest here (FACTS.md).
  The x86 architecture configuration's `kvm` flag is set to False, which is testcloud's own TCG
  path: `<domain type='qemu'>` with its `qemu64` CPU.
- Network: in qemu:///session testcloud adds libvirt's `<interface type='user'>` (slirp with full
  egress) and a second user-mode NIC through qemu arguments whose forwards `tcp::PORT-:22` and
  `tcp::PORT-1000-:10022` bind every interface. The benchmark turns the second NIC's netdev into
  `restrict=on` with both forwards bound to 127.0.0.1, and sets libvirt's NIC `<link state='down'/>`
  (qemu drops every frame of a link that is down), so the guest reaches nothing beyond this machine
  and nothing listens beyond loopback. Both are checked on the live domain every round.
- Readiness: testcloud's session path for cloud images waits for an HTTP server its runcmd starts
  with systemd and python, neither of which the tiny guest has; its other session path (taken for
  CoreOS) waits for the SSH banner on the forwarded port. The benchmark takes that one by setting
  `instance.coreos = True` after prepare(), i.e. once the cloud-init seed has been made. Its check
  decodes the first 1024 bytes it reads as UTF-8; dropbear (tiny guest) sends its banner and its
  binary KEXINIT together, so testcloud raises UnicodeDecodeError at the moment it has the banner:
  the benchmark catches exactly that exception and counts that moment as ready (and says so).

The seed's user-data is the plugin's (same key, same files), passed as testcloud's user-data
template, so every contender's guest does the same work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from boot_common import (
    ConsoleWatch,
    console_patterns,
    cpu_seconds,
    first_ssh_success,
    libvirt_qemu_pid,
    listening_addresses,
)

from pytest_flightctl_device.devices.agent import AgentFile
from pytest_flightctl_device.devices.boot import LOGIN_USER
from pytest_flightctl_device.devices.seed import SeedSpec, new_instance_id, ready_marker, render_user_data
from pytest_flightctl_device.devices.ssh import KeyPair, SshClient

URI = "qemu:///session"
NETDEV = re.compile(r"user,id=(?P<id>[^,]+),hostfwd=tcp::(?P<ssh>\d+)-:22,hostfwd=tcp::(?P<http>\d+)-:10022")


def _isolate(domain: Any) -> dict[str, Any]:
    """restrict=on and loopback-only forwards on testcloud's NIC; libvirt's extra NIC link down."""
    from testcloud.domain_configuration import UserNetworkConfiguration

    changed: dict[str, Any] = {
        "note": "testcloud's own session networking forwards tcp::PORT (every interface) and gives the guest "
                "libvirt's slirp NIC with full egress; the benchmark bound both forwards to 127.0.0.1, added "
                "restrict=on and set libvirt's NIC link down, then checked the live domain and the listeners",
    }
    for device in domain.network_devices:
        if not isinstance(device, UserNetworkConfiguration):
            raise RuntimeError(f"unexpected testcloud network device {type(device).__name__}")
        args = device.additional_qemu_args
        index = args.index("-netdev") + 1
        match = NETDEV.fullmatch(args[index])
        if match is None:
            raise RuntimeError(f"testcloud's netdev changed shape: {args[index]!r}; update the benchmark")
        changed["testcloud_default_netdev"] = args[index]
        args[index] = (f"user,id={match['id']},restrict=on,hostfwd=tcp:127.0.0.1:{match['ssh']}-:22,"
                       f"hostfwd=tcp:127.0.0.1:{match['http']}-:10022")
        changed["benchmark_netdev"] = args[index]
        changed["ports"] = [int(match["ssh"]), int(match["http"])]
        original = device.generate

        def link_down(original: Any = original) -> str:
            return str(original()).replace("<model type='virtio'/>",
                                           "<model type='virtio'/>\n            <link state='down'/>")

        device.generate = link_down
    return changed


def _check_isolated(xml: str, ports: list[int]) -> dict[str, Any]:
    """Read back the live domain: restrict=on, forwards on 127.0.0.1, libvirt's user NIC down."""
    args = re.findall(r"<qemu:arg value=['\"]([^'\"]*)['\"]", xml)
    netdevs = [a for a in args if a.startswith("user,")]
    listeners = {port: listening_addresses(port) for port in ports}
    facts = {
        "restrict_on": bool(netdevs) and all("restrict=on" in a for a in netdevs),
        "forwards_loopback_only": bool(netdevs) and all(
            re.findall(r"hostfwd=tcp:([^:]*):", a) == ["127.0.0.1"] * a.count("hostfwd") for a in netdevs),
        "libvirt_user_nic_link_down": "<link state='down'/>" in xml,
        "listeners": {str(p): a for p, a in listeners.items()},
    }
    if not (facts["restrict_on"] and facts["forwards_loopback_only"] and facts["libvirt_user_nic_link_down"]
            and all(a == ["127.0.0.1"] for a in listeners.values())):
        raise RuntimeError(f"testcloud domain is not isolated as intended: {facts}")
    return facts


class TestcloudContender:
    name = "testcloud"

    def __init__(self, base: Path, keypair: KeyPair, files: tuple[AgentFile, ...], *, memory_mib: int,
                 vcpus: int, scratch: Path, timeout: float) -> None:
        self.keypair = keypair
        self.files = files
        self.memory_mib = memory_mib
        self.vcpus = vcpus
        self.timeout = timeout
        self.data_dir = scratch / "testcloud"
        for sub in ("instances", "backingstores", "console"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        for path in (self.data_dir, *self.data_dir.iterdir()):
            os.chmod(path, 0o755)  # libvirt's qemu user reads the disks and seed
        logging.getLogger("testcloud").setLevel(logging.ERROR)
        from testcloud import config

        cfg = config.get_config()
        cfg.DATA_DIR = str(self.data_dir)  # the setter moves testcloud's sqlite too
        cfg.STORE_DIR = str(self.data_dir / "backingstores")
        cfg.CONSOLE_LOG_DIR = str(self.data_dir / "console")
        cfg.DOWNLOAD_PROGRESS = False
        from testcloud.image import Image

        # testcloud copies a file:// image into its store once, like a download: not timed.
        self.image = Image(f"file://{base}")
        self.image.prepare()
        self.names: list[str] = []
        self.network: dict[str, Any] = {}

    def round(self) -> dict[str, Any]:
        from testcloud.domain_configuration import _get_default_domain_conf
        from testcloud.instance import Instance
        from testcloud.workarounds import Workarounds

        name = f"fcbench-tc-{secrets.token_hex(4)}"
        self.names.append(name)
        instance_id = new_instance_id()
        user_data = render_user_data(SeedSpec(instance_id=instance_id, hostname="tc-bench",
                                              authorized_key=self.keypair.public_line, files=self.files))
        instance: Any = None
        t0 = time.monotonic()
        console_log = self.data_dir / "instances" / name / "console.log"
        watch = ConsoleWatch(lambda: console_log, console_patterns(ready_marker(instance_id)), t0,
                             pid_of=lambda: libvirt_qemu_pid(name))
        watch.start()
        try:
            domain = _get_default_domain_conf(name=name, backingstore_image=self.image, connection=URI,
                                              vcpus=self.vcpus, ram=self.memory_mib, desired_arch="x86_64")
            domain.system_architecture.kvm = False  # testcloud's own TCG path
            network = _isolate(domain)
            instance = Instance(domain_configuration=domain, image=self.image, connection=URI,
                                desired_arch="x86_64", workarounds=Workarounds(defaults=True))
            instance.kvm = False
            phases = {"configured": round(time.monotonic() - t0, 3)}
            instance.prepare(data_tpl=user_data)
            phases["prepared (dirs, seed via genisoimage, overlay)"] = round(time.monotonic() - t0, 3)
            instance.spawn_vm()
            phases["defined"] = round(time.monotonic() - t0, 3)
            instance.coreos = True  # readiness by SSH banner (see the module docstring)
            readiness = "ssh banner"
            try:
                instance.start(self.timeout)
            except UnicodeDecodeError:
                # testcloud decodes its first recv(1024) as UTF-8; dropbear sends its banner and its
                # binary KEXINIT at once, so the check raises at the very moment it has the banner.
                readiness = "ssh banner (testcloud raised UnicodeDecodeError on banner + KEXINIT)"
            ready = time.monotonic()
            pid = libvirt_qemu_pid(name)
            qemu_cpu = cpu_seconds(pid) if pid else None
            dom = instance._get_domain()
            xml = dom.XMLDesc(0)
            network["live_check"] = _check_isolated(xml, network["ports"])
            network["domain_type"] = re.search(r"<domain type='(\w+)'", xml).group(1)  # type: ignore[union-attr]
            cpu = re.search(r"<cpu\b[^>]*?(?:/>|>.*?</cpu>)", xml, re.S)
            network["cpu"] = " ".join(cpu.group(0).split()) if cpu else ""
            self.network = network
            ssh = SshClient(port=network["ports"][0], key=self.keypair.private_path, user=LOGIN_USER,
                            state_dir=self.data_dir / "instances" / name)
            try:
                _banner, ssh_ok = first_ssh_success(ssh.argv("true"), network["ports"][0], t0 + self.timeout,
                                           lambda: bool(dom.isActive()))
            finally:
                ssh.close()
            seen = watch.stop()
            return {"ready_s": round(ready - t0, 3), "qemu_cpu_s": qemu_cpu, "then_ssh_true_s": round(ssh_ok - t0, 3),
                    "phases": phases, "console": seen, "console_qemu_cpu_s": watch.cpu_seen, "readiness": readiness}
        finally:
            watch.stop()
            self._remove(name, instance)

    def _remove(self, name: str, instance: Any) -> None:
        """testcloud's own removal, then make sure by name: no domain, no files."""
        if instance is not None:
            with contextlib.suppress(Exception):
                instance.remove(autostop=True, keep_console_log=False)
        destroy_by_name(name)
        shutil.rmtree(self.data_dir / "instances" / name, ignore_errors=True)

    def close(self) -> None:
        for name in self.names:
            destroy_by_name(name)


def destroy_by_name(name: str) -> None:
    """Destroy and undefine domain `name` if it still exists."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        conn.close()
        return
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefine()
    conn.close()
