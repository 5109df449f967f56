"""--device-prefetch: the next default device boots while a test runs, and is handed over."""

from __future__ import annotations

import time
from pathlib import Path

from tests.integration.conftest import FactoryMaker
from tests.support.helpers import domain_names


def test_spare_is_handed_over_and_cleaned_up(make_factory: FactoryMaker, tiny_guest: Path) -> None:
    factory = make_factory(tiny_guest, memory_mib=256, vcpus=1, prefetch=True, max_vms=4)
    first = factory.create()
    assert factory._spare is not None
    spare_name = factory._spare.vm.name
    factory.wait_spare(timeout=300)  # the "test" runs long enough for the spare to boot
    assert not factory._spare.errors
    factory.release(first)
    asked = time.monotonic()
    second = factory.create()
    assert second.name == spare_name
    assert 0 < second.ready_at < asked  # ready before it was asked for
    assert second.run("hostname").stdout.strip() == spare_name
    next_spare = factory._spare
    assert next_spare is not None and next_spare.vm.name != spare_name

    # A request that is not the default one gets a fresh device; the idle spare is dropped.
    other = factory.create(memory_mib=300)
    assert other.name not in (spare_name, next_spare.vm.name)
    assert next_spare.vm.name not in domain_names(factory.settings.libvirt_uri[0])
    assert not next_spare.vm.dir.exists()
    factory.release(other)
    factory.release(second)

    third = factory.create()
    assert factory._spare is not None
    pending = factory._spare.vm
    factory.close()  # also ends a spare that is still booting
    names = domain_names(factory.settings.libvirt_uri[0])
    assert third.name not in names and pending.name not in names
    assert not pending.dir.exists()
