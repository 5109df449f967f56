"""Static checks of containerfiles/ (the real bootc ones cannot be built here) and of the test
stand-ins under tests/support/images/containerfiles, which must keep the same structure."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pytest_flightctl_device.images.build import default_containerfiles

REAL = default_containerfiles()
TEST = Path(__file__).resolve().parents[1] / "support" / "images" / "containerfiles"
VARIANTS = ("base", "v2", "v3", "v4")
GIT_ARGS = ("SOURCE_GIT_TAG", "SOURCE_GIT_TREE_STATE", "SOURCE_GIT_COMMIT")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    joined, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    assert not pending, f"{path} ends inside a continuation line"
    result = []
    for text in joined:
        word, _, rest = text.strip().partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


@pytest.mark.parametrize("root", [REAL, TEST], ids=["real", "test"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_arg_base_image_before_from_and_git_args_labelled(root: Path, variant: str) -> None:
    steps = instructions(root / f"Containerfile-{variant}")
    assert steps[0][0] == "ARG" and steps[0][1].split("=")[0] == "BASE_IMAGE"
    assert steps[1] == ("FROM", "${BASE_IMAGE}")
    assert [s for s in steps if s[0] == "FROM"] == [steps[1]], "one stage only"
    declared = {s[1].split("=")[0] for s in steps[2:] if s[0] == "ARG"}
    labels = " ".join(s[1] for s in steps if s[0] == "LABEL")
    for arg in GIT_ARGS:
        assert arg in declared, f"{variant}: ARG {arg} missing after FROM"
        assert f"${{{arg}}}" in labels, f"{variant}: {arg} is not a label"
    assert f'io.flightctl.device.variant="{variant}"' in labels


@pytest.mark.parametrize("root", [REAL, TEST], ids=["real", "test"])
@pytest.mark.parametrize("variant", ("v2", "v3", "v4"))
def test_variants_diverge_at_their_first_step(root: Path, variant: str) -> None:
    """Variants build in parallel: identical leading steps would race in the layer cache."""
    steps = instructions(root / f"Containerfile-{variant}")
    assert steps[2][0] in ("COPY", "RUN", "ADD")
    assert variant in steps[2][1]


@pytest.mark.parametrize("root", [REAL, TEST], ids=["real", "test"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_copy_source_exists(root: Path, variant: str) -> None:
    for word, rest in instructions(root / f"Containerfile-{variant}"):
        if word in ("COPY", "ADD"):
            sources = [part for part in rest.split() if not part.startswith("--")][:-1]
            for source in sources:
                assert (root / source).exists(), f"{variant}: {source} is not in {root}"


def test_base_image_default_and_what_it_installs() -> None:
    steps = instructions(REAL / "Containerfile-base")
    assert steps[0] == ("ARG", "BASE_IMAGE=quay.io/centos-bootc/centos-bootc:stream9")
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    for needle in ("cloud-init", "default.target.wants", "cloud-init.target", "greenboot",
                   "podman-compose", "firewalld", "systemctl enable firewalld.service podman.service",
                   "GREENBOOT_MAX_BOOT_ATTEMPTS=1", "useradd -ms /bin/bash user", 'echo "user:user" | chpasswd',
                   "NOPASSWD: ALL", "systemctl enable flightctl-agent.service", "/tmp/rpms/*.rpm",
                   "dnf -y copr enable", "flightctl-agent flightctl-greenboot flightctl-selinux", "epel-release"):
        assert needle in runs, needle
    copies = [rest for word, rest in steps if word == "COPY"]
    assert "rpms/ /tmp/rpms/" in copies
    assert copies.index("rpms/ /tmp/rpms/") == len(copies) - 1, "the agent comes last (cache)"
    for name in ("siteName", "emptyValue", "keyNotShown"):
        script = REAL / "base" / "custom-info.d" / name
        assert script.read_text().startswith("#!/bin/bash\n") and script.stat().st_mode & 0o111
    assert re.search(r"^Z /etc/flightctl\b", (REAL / "base" / "flightctl-selinux-labels.conf").read_text(), re.M)


def test_no_certificate_key_or_agent_config_in_any_image() -> None:
    for path in REAL.rglob("*"):
        if not path.is_file():
            continue
        assert path.suffix not in (".crt", ".key", ".pem", ".p12"), path
        assert path.name != "config.yaml", path
        text = path.read_text(errors="replace")
        assert "-----BEGIN" not in text, path
        assert "/etc/flightctl/config.yaml" not in text and "/etc/flightctl/certs" not in text, path


def test_variant_services() -> None:
    sleep = (REAL / "v2" / "test-e2e-sleep.service").read_text()
    assert "ExecStart=/usr/bin/sleep infinity" in sleep and "Restart=no" in sleep
    crashing = (REAL / "v2" / "test-e2e-crashing.service").read_text()
    assert "ExecStart=/usr/bin/false" in crashing
    assert "Restart=always" in crashing and "RestartSec=30" in crashing
    another = (REAL / "v3" / "test-e2e-another-sleep.service").read_text()
    assert "ExecStart=/usr/bin/sleep infinity" in another
    for unit in (sleep, crashing, another):
        assert "WantedBy=multi-user.target" in unit
    v2 = " ".join(rest for _word, rest in instructions(REAL / "Containerfile-v2"))
    assert "systemctl enable test-e2e-sleep.service test-e2e-crashing.service" in v2
    assert "systemctl enable test-e2e-another-sleep.service" in " ".join(
        rest for _word, rest in instructions(REAL / "Containerfile-v3"))


def test_v4_compose_application() -> None:
    copies = [rest for word, rest in instructions(REAL / "Containerfile-v4") if word == "COPY"]
    target = copies[0].split()[-1]
    assert re.fullmatch(r"/usr/local/etc/compose/manifests/[a-z0-9-]+/podman-compose\.yaml", target)
    compose = yaml.safe_load((REAL / copies[0].split()[0]).read_text())
    assert compose["services"] and all("image" in svc for svc in compose["services"].values())
