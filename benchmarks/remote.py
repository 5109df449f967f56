"""Remote libvirt host figures: the base upload through libvirt, and a boot remote vs local.

The remote host is played by a dropbear sshd on 127.0.0.1 (tests/support/sshd.py) behind
`qemu+ssh://root@127.0.0.1:PORT/system`, so the figures are those of libvirt's ssh transport,
storage upload and console stream, without a network's latency. Runs as root (qemu:///system).

    .venv/bin/python benchmarks/remote.py [--guest debian|tiny] [--rounds N]

Prints JSON: upload_s (the first upload into a fresh pool), second_s (the same base again:
nothing is uploaded), and ready-after seconds per round for `local` and `remote` boots of the
same image, alternated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_flightctl_device.devices.agent import throwaway_agent_config
from pytest_flightctl_device.devices.domain import open_libvirt
from pytest_flightctl_device.devices.factory import DeviceVMFactory
from pytest_flightctl_device.devices.volumes import HostStore, base_digest
from pytest_flightctl_device.settings import Settings
from tests.guest.build import build_guest
from tests.support.helpers import remove_pool, scratch_pool
from tests.support.sshd import ssh_server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--guest", choices=("debian", "tiny"), default="debian")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    guest = build_guest(args.guest)
    local = open_libvirt("qemu:///system")
    pool_name = f"fcdev-bench-{secrets.token_hex(3)}"
    pool_path = Path("/var/tmp") / pool_name
    pool = scratch_pool(local, pool_name, pool_path)
    result: dict[str, object] = {"guest": args.guest, "size_mib": round(guest.stat().st_size / 2**20, 1)}
    try:
        with tempfile.TemporaryDirectory() as scratch, ssh_server(Path(scratch)) as server:
            uri = (f"qemu+ssh://{server.user}@127.0.0.1:{server.port}/system"
                   f"?keyfile={server.key.private_path}&no_verify=1")
            digest = base_digest(guest)
            remote = open_libvirt(uri)
            started = time.monotonic()
            HostStore(remote, "bench", pool_name, lambda _m: None).base(guest, digest)
            result["upload_s"] = round(time.monotonic() - started, 2)
            started = time.monotonic()
            HostStore(remote, "bench", pool_name, lambda _m: None).base(guest, digest)
            result["second_s"] = round(time.monotonic() - started, 3)
            remote.close()
            result["upload_mib_s"] = round(guest.stat().st_size / 2**20 / float(result["upload_s"]), 1)
            base = dataclasses.replace(Settings.resolve({}, {}, {}), network="isolated", memory_mib=1024,
                                       vcpus=1, libvirt_pool=pool_name,
                                       workdir=pool_path.with_name(pool_name + "-work"))
            times: dict[str, list[float]] = {"local": [], "remote": []}
            factories = {name: DeviceVMFactory(dataclasses.replace(base, libvirt_uri=(target,)), base_image=guest,
                                               agent=throwaway_agent_config(), run_id=secrets.token_hex(4),
                                               worker="b")
                         for name, target in (("local", "qemu:///system"), ("remote", uri))}
            try:
                for _round in range(args.rounds):
                    for name, factory in factories.items():
                        vm = factory.create()
                        times[name].append(round(vm.boot_seconds, 2))
                        factory.release(vm)
            finally:
                for factory in factories.values():
                    factory.close()
            result["ready_s"] = times
    finally:
        remove_pool(pool, pool_path)
        shutil.rmtree(pool_path.with_name(pool_name + "-work"), ignore_errors=True)
        local.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
