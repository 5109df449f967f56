"""Chaos: `kill -9` of a real pytest run at random moments; nothing leaks and the next run just works.

Rounds cycle through four phases (a download into the cache, a bundle load into podman, a device
boot, commands in a running device). Each round starts a real `python -m pytest` over the small
suite in chaos_inner.py, waits until the run is visibly inside the phase (a partial file grows,
a progress line appears, a VM directory or a test mark shows up), waits a random delay from a
seeded RNG and kills it with SIGKILL. Then: no qemu of the killed run runs 2 s later (a kill while
libvirt is still starting the domain is the exception libvirt imposes: it finishes the start before
it autodestroys, so there the bound is STARTING_DEADLINE_S and the time is reported apart) and
libvirt drops its domains; every process the run forked is gone; the cache holds only verified entries;
and the same phase's test, run again with no manual cleanup, passes, its janitor removing what
the killed run left in the work directory. Replay a run with PFTD_CHAOS_SEED=<seed it printed>.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pytest_flightctl_device.artifacts.cache import Cache, sha256_file
from pytest_flightctl_device.core.formats import FILE
from pytest_flightctl_device.devices.domain import open_libvirt
from pytest_flightctl_device.errors import MissingToolError
from pytest_flightctl_device.images import podman
from pytest_flightctl_device.settings import VARIANTS, Settings
from tests.support import chaos_inner
from tests.support.chaos_http import SlowFileServer
from tests.support.chaos_watch import (
    active_domains,
    domain_running,
    qemu_processes,
    running,
    tagged_processes,
    wait_until,
)
from tests.support.github_emulator import TOKEN, GitHubEmulator
from tests.support.helpers import missing, require_tool
from tests.support.images.stand_ins import busybox_rootfs_tar, import_image, podman_conn, remove_images, test_repo

__all__ = ["podman_conn", "test_repo"]  # session fixtures used below

PHASES = ("download", "bundle", "boot", "vm-run")
QCOW2_PAYLOAD = 8 << 20  # random bytes inside the served qcow2: ~3 s of body at THROTTLE
LAYER_PAYLOAD = 12 << 20  # random bytes per variant image in the bundle
THROTTLE = 3e6  # bytes/s while a kill is to land mid-body; recoveries download at full speed
DOMAIN_DEADLINE_S = 2.0  # no qemu of a killed run whose domain was running may run longer than this
# A kill while libvirt is still starting the domain (createXML in flight): libvirt finishes the start,
# then autodestroys; measured here 1.2-2.2 s, and a destroy from elsewhere blocks as long. Bounded, reported.
STARTING_DEADLINE_S = 10.0
STARTING = "boot-domain-starting"
LIBVIRT_DEADLINE_S = 15.0  # libvirt's own bookkeeping (it waits for qemu to be reaped)
SURVIVOR_GRACE_S = 5.0  # forked helpers (ssh masters) end once their VM is gone
TRIGGER_TIMEOUT_S = 180.0
RECOVERY_TIMEOUT_S = 400.0
BOOT_DELAY_S = (0.0, 3.0)  # after the VM directory appears: seed, overlay, domain start, early boot
VM_RUN_DELAY_S = (0.0, 2.0)  # after the test body started: inside put_file/run over SSH


@dataclass
class PhaseFigures:
    """What one phase's rounds saw; written to chaos.json."""

    kills: int = 0
    landed: dict[str, int] = field(default_factory=dict)
    leftovers_found: int = 0
    leftovers_removed: int = 0
    leftover_kinds: dict[str, int] = field(default_factory=dict)
    not_removed: list[str] = field(default_factory=list)
    corrupt_entries: int = 0
    entry_checks: int = 0
    qemu_exit_s: list[float] = field(default_factory=list)
    qemu_exit_after_kill_in_start_s: list[float] = field(default_factory=list)
    libvirt_gone_s: list[float] = field(default_factory=list)
    resumed_downloads: int = 0
    tags_present_after_kill: list[int] = field(default_factory=list)
    delays_s: list[float] = field(default_factory=list)
    recovery_s: list[float] = field(default_factory=list)


@dataclass
class Leftover:
    kind: str
    what: str
    gone: Callable[[], bool]


@dataclass
class Chaos:
    """One chaos session: one cache dir and one work dir shared by every round."""

    root: Path
    uri: str
    conn: Any
    pod: podman.Podman
    rng: random.Random
    tiny: Path
    bundle: Path
    refs: list[str]
    image_repo: str
    load_s: float
    http: SlowFileServer
    gh: GitHubEmulator
    seed: int
    test_file: Path
    figures: dict[str, PhaseFigures] = field(default_factory=lambda: {p: PhaseFigures() for p in PHASES})
    _log: Path | None = field(default=None, init=False)

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def work(self) -> Path:
        return self.root / "work"

    def common_args(self) -> list[str]:
        return [f"--device-cache-dir={self.cache}", f"--device-workdir={self.work}",
                f"--device-libvirt-uri={self.uri}", "--device-network=isolated", "--device-memory-mib=256",
                "--device-vcpus=1", "--device-boot-timeout=60"]

    # -- one round -------------------------------------------------------------------------------

    def round(self, index: int, phase: str) -> None:
        figures = self.figures[phase]
        token = f"r{index}-{self.rng.getrandbits(32):08x}"
        marks = self.root / "marks" / token
        marks.mkdir(parents=True)
        args, env, trigger, after_kill, recovered = self._phase(index, phase, marks)
        before_dirs = {d.name for d in self.work.glob("fcdev-*")}
        before_tmp = set(self._cache_tmp())
        log = self.root / "out" / f"{token}.txt"
        log.parent.mkdir(exist_ok=True)
        with log.open("wb") as out:
            proc = chaos_inner.start(self.test_file, phase, args + self.common_args(),
                                     chaos_inner.inner_env(token, marks, env), out)
            try:
                delay = self._wait_trigger(proc, trigger, log, phase)
                if delay:
                    time.sleep(delay)
                landed = self._landed(phase, marks, proc)
            finally:
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)  # the process this round started, by its PID
                killed_at = time.monotonic()
                proc.wait()
        figures.kills += 1
        figures.delays_s.append(round(delay, 3))
        figures.landed[landed] = figures.landed.get(landed, 0) + 1

        killed = [d for d in self.work.glob("fcdev-*") if d.name not in before_dirs]
        prefixes = sorted({"fcdev-" + d.name.split("-")[1] + "-" for d in killed})
        self._check_domains(figures, prefixes, phase, index, killed_at, landed)
        after_kill()
        leftovers = self._leftovers(token, killed, before_tmp)
        self._check_cache(figures, phase, index)

        started = time.monotonic()
        result = self._recover(index, phase, marks, args, env)
        figures.recovery_s.append(round(time.monotonic() - started, 1))
        assert result.returncode == 0, (
            f"round {index} ({phase}): the run after the kill failed (exit {result.returncode}); "
            f"seed {self.seed}:\n{result.stdout[-4000:]}")
        recovered(figures)
        self._count_removed(figures, leftovers, token)
        stray = [d.name for d in self.work.glob("fcdev-*")]
        assert not stray, f"round {index} ({phase}): work directories left after a clean run: {stray}"

    # -- phases ------------------------------------------------------------------------------------

    def _phase(self, index: int, phase: str, marks: Path) -> tuple[
            list[str], dict[str, str], Callable[[], bool], Callable[[], None], Callable[[PhaseFigures], None]]:
        """(args, env, trigger, after_kill, recovered) for this round's phase."""
        if phase == "download":
            return self._download(index)
        if phase == "bundle":
            return self._bundle_round(marks)
        env = {"PFTD_CHAOS_VM_SECONDS": "600" if phase == "vm-run" else "0"}
        args = [f"--device-qcow2={self.tiny}"]
        if phase == "boot":
            before = {d.name for d in self.work.glob("fcdev-*")}

            def vm_dir_made() -> bool:
                return any(d.parent.name not in before for d in self.work.glob("fcdev-*/1"))

            return args, env, vm_dir_made, _nothing, _no_figures
        started = marks / "vm-started"
        return args, env, started.exists, _nothing, _no_figures

    def _download(self, index: int) -> tuple[
            list[str], dict[str, str], Callable[[], bool], Callable[[], None], Callable[[PhaseFigures], None]]:
        via_github = (index // len(PHASES)) % 2 == 1
        qcow2 = make_qcow2(self.root / "served" / f"r{index}.qcow2", self.rng)  # new content: no cache hit
        sha = sha256_file(qcow2)
        if via_github:
            run = self.gh.add_run(f"{index:040x}")
            name = f"agent-qcow2-image-r{index}"
            artifact = self.gh.add_artifact(run, name, qcow2, member="disk.qcow2")
            total = qcow2.stat().st_size  # one pass: only the member's bytes are written, to `<key>.member`
            args = [f"--device-github-run={run.id}", f"--device-github-api-url={self.gh.api_url}",
                    f"--device-qcow2-artifact={name}"]
            suffix = ".member"
        else:
            url_path = f"/r{index}/disk.qcow2"
            url = self.http.add(url_path, qcow2)
            total = qcow2.stat().st_size
            args = [f"--device-qcow2={url}", f"--device-qcow2-sha256={sha}"]
            suffix = ".part"
        threshold = int(total * self.rng.uniform(0.05, 0.9))
        env = {"PFTD_CHAOS_SHA256": sha, "GITHUB_TOKEN": TOKEN}
        self.http.throttle = self.gh.throttle = THROTTLE
        sizes: list[int] = []

        def partial_size() -> int:
            return max((p.stat().st_size for p in self._cache_tmp() if p.name.endswith(suffix)), default=0)

        def trigger() -> bool:
            return partial_size() >= threshold

        def after_kill() -> None:
            sizes.append(partial_size())
            assert 0 < sizes[0] < total, (
                f"download round {index}: the kill did not land mid-body ({sizes[0]} of {total} bytes)")
            self.http.throttle = self.gh.throttle = None

        def recovered(figures: PhaseFigures) -> None:
            if via_github:
                resumed = any(r.artifact_id == artifact.id and r.status == 206 for r in self.gh.blob_log)
            else:
                resumed = any(path == url_path and status == 206 for path, _range, status in self.http.log)
            figures.resumed_downloads += resumed

        return args, env, trigger, after_kill, recovered

    def _bundle_round(self, marks: Path) -> tuple[
            list[str], dict[str, str], Callable[[], bool], Callable[[], None], Callable[[PhaseFigures], None]]:
        clear_tags(self.pod, self.refs)
        args = [f"--device-bundle={self.bundle}", f"--device-image-repo={self.image_repo}",
                "--device-image-tag=c1", f"--device-podman-url={self.pod.url}"]
        env = {"PFTD_CHAOS_TAGS": ",".join(self.refs)}
        present: list[int] = []

        def trigger() -> bool:
            return f"loading {self.bundle.name}" in self._log_text()

        def after_kill() -> None:
            time.sleep(1.0)  # what the service made of the cut-off upload, a moment later
            tags = self.pod.tag_ids()
            present.append(sum(ref in tags for ref in self.refs))

        def recovered(figures: PhaseFigures) -> None:
            figures.tags_present_after_kill.extend(present)

        return args, env, trigger, after_kill, recovered

    # -- watching ------------------------------------------------------------------------------------

    def _log_text(self) -> str:
        return self._log.read_text(errors="replace") if self._log and self._log.exists() else ""

    def _wait_trigger(self, proc: subprocess.Popen[bytes], trigger: Callable[[], bool], log: Path,
                      phase: str) -> float:
        """Wait until the run is inside `phase`; returns the random delay to wait before the kill."""
        self._log = log
        deadline = time.monotonic() + TRIGGER_TIMEOUT_S
        while not trigger():
            if proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited {proc.returncode}" if proc.returncode is not None else "timed out"
                pytest.fail(f"the inner run never reached the {phase} phase ({state}); seed {self.seed}; "
                            f"its output:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.02)
        if phase == "bundle":
            return self.rng.uniform(0.0, self.load_s)
        if phase == "boot":
            return self.rng.uniform(*BOOT_DELAY_S)
        if phase == "vm-run":
            return self.rng.uniform(*VM_RUN_DELAY_S)
        return 0.0  # download: the random moment is the byte count drawn for the trigger

    def _landed(self, phase: str, marks: Path, proc: subprocess.Popen[bytes]) -> str:
        """Where the kill lands, by what the run has shown so far (and libvirt's view of its domain)."""
        if proc.poll() is not None:
            return "after-exit"
        if phase == "bundle":
            return "bundle-after-load" if (marks / "images-loaded").exists() else "bundle"
        if phase in ("boot", "vm-run"):
            if (marks / "vm-started").exists():
                return "vm-run"
            runs = {"fcdev-" + d.name.split("-")[1] + "-" for d in self.work.glob("fcdev-*")}
            return "boot" if any(domain_running(self.conn, prefix) for prefix in runs) else STARTING
        return phase

    def _check_domains(self, figures: PhaseFigures, prefixes: list[str], phase: str, index: int,
                       killed_at: float, landed: str) -> None:
        """No qemu of the killed run runs 2 s after the kill; libvirt then drops its domains."""
        deadline = STARTING_DEADLINE_S if landed == STARTING else DOMAIN_DEADLINE_S
        def no_qemu() -> bool:
            return not any(qemu_processes(prefix) for prefix in prefixes)

        def no_domains() -> bool:
            return not any(active_domains(self.conn, prefix, self.work) for prefix in prefixes or [""])

        wait_until(no_qemu, deadline - (time.monotonic() - killed_at))
        qemu_s = time.monotonic() - killed_at
        left = {pid: name for prefix in prefixes for pid, name in qemu_processes(prefix).items()}
        assert not left, (
            f"round {index} ({phase}, kill landed: {landed}): qemu of the killed run still runs {deadline} s "
            f"after kill -9: {left}; seed {self.seed}")
        gone = wait_until(no_domains, LIBVIRT_DEADLINE_S, poll=0.1)
        assert gone is not None, (
            f"round {index} ({phase}): libvirt still lists the killed run's domains "
            f"{LIBVIRT_DEADLINE_S} s after its qemu ended; seed {self.seed}")
        if prefixes:
            exits = figures.qemu_exit_after_kill_in_start_s if landed == STARTING else figures.qemu_exit_s
            exits.append(round(qemu_s, 2))
            figures.libvirt_gone_s.append(round(time.monotonic() - killed_at, 2))

    def _cache_tmp(self) -> list[Path]:
        return sorted((self.cache / "tmp").glob("*")) if (self.cache / "tmp").is_dir() else []

    def _stray_temps(self) -> list[Path]:
        """Half-written sidecar/index temps (`.name.pid.hex`) outside tmp/: nobody would remove them."""
        return [p for sub in ("index", "objects") for p in (self.cache / sub).rglob(".*") if p.is_file()]

    def _leftovers(self, token: str, killed: list[Path], before_tmp: set[Path]) -> list[Leftover]:
        """Everything the killed run left: work dirs, cache temp files, processes it forked."""
        wait_until(lambda: not tagged_processes(token), SURVIVOR_GRACE_S, poll=0.1)
        found = [Leftover("workdir", d.name, _path_gone(d)) for d in killed]
        found += [Leftover("cache-tmp", p.name, _path_gone(p)) for p in self._cache_tmp() if p not in before_tmp]
        found += [Leftover("cache-stray", str(p.relative_to(self.cache)), _path_gone(p))
                  for p in self._stray_temps()]
        found += [Leftover("podman-spool", p.name, _path_gone(p)) for p in (self.root / "podman-tmp").iterdir()]
        found += [Leftover("process", f"{pid} {cmd}", _process_gone(pid))
                  for pid, cmd in tagged_processes(token).items()]
        return found

    def _check_cache(self, figures: PhaseFigures, phase: str, index: int) -> None:
        """Every object re-hashes to its name and passes its kind's check; every index entry has one.

        Read-only on purpose (Cache.check(), not verify(), which removes what fails and sweeps temps): what
        the killed run left must be found here and removed by the next run, not by this check.
        """
        cache = Cache(self.cache)
        figures.entry_checks += len(cache.entries())
        problems = [f"{problem.path.name}: {problem.reason}" for problem in cache.check()]
        for index_file in cache.index.glob("*.json"):
            data = json.loads(index_file.read_text())
            if cache.find(data["digest"], data["kind"]) is None:
                problems.append(f"index {index_file.name} names a missing object")
        figures.corrupt_entries += len(problems)
        assert not problems, (f"round {index} ({phase}): the cache held unverified entries after kill -9: "
                              f"{problems}; seed {self.seed}")

    def _recover(self, index: int, phase: str, marks: Path, args: list[str],
                 env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        """The same phase's test again, to completion, with nothing cleaned by hand."""
        token = f"r{index}-recovery"
        env = {**env, "PFTD_CHAOS_VM_SECONDS": "0"}
        for mark in marks.iterdir():
            mark.unlink()
        log = self.root / "out" / f"{token}.txt"
        with log.open("wb") as out:
            proc = chaos_inner.start(self.test_file, phase, args + self.common_args(),
                                     chaos_inner.inner_env(token, marks, env), out)
            try:
                proc.wait(timeout=RECOVERY_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(errors="replace"), "")

    def _count_removed(self, figures: PhaseFigures, leftovers: list[Leftover], token: str) -> None:
        figures.leftovers_found += len(leftovers)
        for leftover in leftovers:
            figures.leftover_kinds[leftover.kind] = figures.leftover_kinds.get(leftover.kind, 0) + 1
            if leftover.gone():
                figures.leftovers_removed += 1
            else:
                figures.not_removed.append(f"{leftover.kind}: {leftover.what}")
        for pid in tagged_processes(token):  # ours (forked by a run this test started): end them, by PID
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _path_gone(path: Path) -> Callable[[], bool]:
    return lambda: not path.exists()


def _process_gone(pid: int) -> Callable[[], bool]:
    return lambda: not running(pid)


def _nothing() -> None:
    return None


def _no_figures(_figures: PhaseFigures) -> None:
    return None


# -- set-up: artifacts, servers, directories --------------------------------------------------------


@contextlib.contextmanager
def own_podman_service(root: Path) -> Iterator[podman.Podman]:
    """A `podman system service` for the inner runs' loads, with its spool dir (TMPDIR) under `root`,
    so a spool file a killed load leaves is seen as this test's own (stopped by its PID at the end)."""
    spool = root / "podman-tmp"
    spool.mkdir()
    socket = root / "podman.sock"
    service = subprocess.Popen([require_tool("podman"), "system", "service", "--time=0", f"unix://{socket}"],
                               env={**os.environ, "TMPDIR": str(spool)}, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        conn = podman.Podman(f"unix://{socket}")
        answered = wait_until(lambda: socket.exists() and _pings(conn), 30, poll=0.1)
        assert answered is not None, "the chaos test's own podman service did not answer within 30 s"
        yield conn
        conn.close()
    finally:
        service.terminate()
        try:
            service.wait(timeout=15)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()


def _pings(conn: podman.Podman) -> bool:
    try:
        return bool(conn.api.get("/_ping").status_code == 200)
    except Exception:  # not listening yet
        return False


def clear_tags(conn: podman.Podman, refs: list[str]) -> None:
    """Remove the bundle's tags so the next load really loads (a cut-off load may finish late)."""
    for _attempt in range(20):
        remove_images(conn, refs)
        if not set(refs) & set(conn.tag_ids()):
            return
        time.sleep(0.5)
    raise AssertionError(f"podman kept {refs} after removal")


def make_qcow2(dest: Path, rng: random.Random) -> Path:
    """A valid qcow2 holding QCOW2_PAYLOAD random bytes (incompressible, so the body takes time)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    raw = dest.with_suffix(".raw")
    raw.write_bytes(rng.randbytes(QCOW2_PAYLOAD))
    subprocess.run([require_tool("qemu-img"), "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(dest)],
                   check=True)
    raw.unlink()
    return dest


def make_bundle(conn: podman.Podman, repo: str, work: Path, rng: random.Random) -> tuple[Path, list[str]]:
    """A `podman save -m` bundle of four single-layer images (busybox + random bytes), not loaded."""
    rootfs = busybox_rootfs_tar(work / "rootfs.tar")
    refs = []
    for variant in VARIANTS:
        layer = work / f"{variant}.tar"
        shutil.copyfile(rootfs, layer)
        payload = rng.randbytes(LAYER_PAYLOAD)
        with tarfile.open(layer, "a") as tar:
            info = tarfile.TarInfo(f"var/chaos-{variant}.bin")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        ref = f"{repo}:{variant}-c1"
        import_image(conn, layer, ref)
        refs.append(ref)
        layer.unlink()
    bundle = conn.export(refs, work / "chaos-bundle.tar")
    clear_tags(conn, refs)
    return bundle, refs


@pytest.fixture
def chaos_root(device_settings: Settings) -> Iterator[Path]:
    """One work+cache root under /var/tmp (qemu, another user, must traverse to the overlays)."""
    root = Path(tempfile.mkdtemp(prefix="pftd-chaos-", dir="/var/tmp"))
    root.chmod(0o711)
    (root / "cache").mkdir()
    verdict = device_settings.accel_file
    if verdict.is_file():  # the KVM verdict of this host: no KVM probe in every chaos round
        shutil.copy2(verdict, root / "cache" / "accel.json")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_kill_9_at_random_moments_leaves_nothing_and_the_next_run_passes(
        chaos_kills: int, device_settings: Settings, tiny_guest: Path, podman_conn: podman.Podman,
        test_repo: str, chaos_root: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    seed = int(os.environ.get("PFTD_CHAOS_SEED") or random.SystemRandom().getrandbits(32))
    print(f"chaos seed {seed} (replay with PFTD_CHAOS_SEED={seed}), {chaos_kills} kills")
    rng = random.Random(seed)
    try:
        conn = open_libvirt(device_settings.libvirt_uri[0])
    except MissingToolError as exc:
        missing(str(exc))
        raise
    image_repo = f"{test_repo}/chaos"
    bundle, refs = make_bundle(podman_conn, image_repo, chaos_root, rng)
    started = time.monotonic()
    podman_conn.load_stream(bundle)  # how long a load takes here: the bundle kills land within it
    load_s = time.monotonic() - started
    clear_tags(podman_conn, refs)
    figures_path = tmp_path / "chaos.json"
    (chaos_root / "gh").mkdir()
    with SlowFileServer() as http, GitHubEmulator(chaos_root / "gh") as gh, own_podman_service(chaos_root) as pod:
        chaos = Chaos(root=chaos_root, uri=device_settings.libvirt_uri[0], conn=conn, pod=pod, rng=rng,
                      tiny=tiny_guest, bundle=bundle, refs=refs,
                      image_repo=image_repo, load_s=load_s, http=http, gh=gh, seed=seed,
                      test_file=chaos_inner.write_suite(chaos_root / "suite"))
        try:
            for index in range(chaos_kills):
                chaos.round(index, PHASES[index % len(PHASES)])
        finally:
            report = {"seed": seed, "kills": chaos_kills, "bundle_load_s": round(load_s, 2),
                      "totals": _totals(chaos.figures),
                      "phases": {phase: asdict(f) for phase, f in chaos.figures.items()}}
            figures_path.write_text(json.dumps(report, indent=1))
            print(json.dumps(report, indent=1))
            request.node.user_properties.append(("chaos", json.dumps(report)))
            _destroy_our_domains(conn, chaos_root)
            conn.close()
            clear_tags(podman_conn, refs)
    for phase, figures in chaos.figures.items():
        assert figures.corrupt_entries == 0, f"{phase}: corrupt cache entries after kill -9"
        assert figures.leftovers_removed == figures.leftovers_found, (
            f"{phase}: leftovers the next run did not remove: {figures.not_removed}; seed {seed}")
    assert sum(f.kills for f in chaos.figures.values()) == chaos_kills


def _totals(figures: dict[str, PhaseFigures]) -> dict[str, Any]:
    every = figures.values()
    return {"kills": sum(f.kills for f in every),
            "leftovers_found": sum(f.leftovers_found for f in every),
            "leftovers_removed": sum(f.leftovers_removed for f in every),
            "corrupt_entries": sum(f.corrupt_entries for f in every),
            "resumed_downloads": sum(f.resumed_downloads for f in every),
            "max_qemu_exit_s": max((s for f in every for s in f.qemu_exit_s), default=None),
            "max_qemu_exit_after_kill_in_start_s": max(
                (s for f in every for s in f.qemu_exit_after_kill_in_start_s), default=None),
            "max_libvirt_gone_s": max((s for f in every for s in f.libvirt_gone_s), default=None)}


def _destroy_our_domains(conn: Any, root: Path) -> None:
    """After a failure only: any domain still running over this test's directories is ours to end."""
    import libvirt

    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        with contextlib.suppress(libvirt.libvirtError):
            if dom.name().startswith("fcdev-") and str(root) in dom.XMLDesc(0):
                dom.destroy()


# -- kill -9 at the exact worst moments of a cache write ---------------------------------------------

POINT_KILL = '''
import os, signal, sys
from pathlib import Path
from pytest_flightctl_device.artifacts import cache
from pytest_flightctl_device.core.formats import FILE

root, point = Path(sys.argv[1]), sys.argv[2]
real_replace = os.replace


def replace(src, dst):  # the cache's object rename and every core.atomic write go through here
    dst = Path(dst)
    in_objects = dst.parent.parent.name == "objects"
    if {"object": in_objects and dst.suffix != ".json", "sidecar": in_objects and dst.suffix == ".json",
            "index": dst.parent.name == "index"}[point]:
        os.kill(os.getpid(), signal.SIGKILL)  # dies with the temp written and not yet renamed
    real_replace(src, dst)


os.replace = replace
cache.Cache(root).obtain("chaos:point", lambda tmp: tmp.write_bytes(b"chaos payload") and None, FILE,
                         source="chaos")
'''


def _payload_producer(payload: bytes) -> Callable[[Path], str | None]:
    def produce(tmp: Path) -> None:
        tmp.write_bytes(payload)

    return produce


def _strays(cache: Cache) -> list[str]:
    """Temps outside a rename: hidden json temps anywhere, anything in tmp/."""
    return sorted(str(p.relative_to(cache.root)) for p in cache.root.rglob("*")
                  if p.is_file() and (p.name.startswith(".") or p.parent == cache.tmp))


def _kill_at(point: str, root: Path) -> None:
    child = subprocess.run([sys.executable, "-c", POINT_KILL, str(root), point], capture_output=True, text=True,
                           check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr


@pytest.mark.parametrize("point", ["object", "sidecar", "index"])
def test_kill_9_just_before_a_cache_rename_leaves_nothing_after_the_next_obtain(point: str, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    _kill_at(point, root)
    cache = Cache(root)
    path = cache.obtain("chaos:point", _payload_producer(b"chaos payload"), FILE, source="chaos")
    assert path.read_bytes() == b"chaos payload"
    assert cache.verify() == []
    digest = sha256_file(path)
    objects = sorted(str(p.relative_to(root)) for p in cache.objects.rglob("*")
                     if p.is_file() and not p.name.startswith("."))
    assert objects == [f"objects/{digest[:2]}/{digest}.bin", f"objects/{digest[:2]}/{digest}.bin.json"]
    assert _strays(cache) == [], f"kill -9 before the {point} rename left files the next obtain kept"


@pytest.mark.parametrize("point", ["object", "sidecar", "index"])
def test_cache_verify_removes_what_a_writer_killed_before_its_rename_left(point: str, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    _kill_at(point, root)
    cache = Cache(root)
    assert _strays(cache), f"the kill before the {point} rename should have left a temp"
    assert cache.verify() == []
    assert _strays(cache) == []


FETCH = '''
import sys
from pathlib import Path
from pytest_flightctl_device.artifacts.cache import Cache
from pytest_flightctl_device.artifacts.sources.http import fetch_url
fetch_url(sys.argv[2], Cache(Path(sys.argv[1])), kind="file", sha256=None)
'''


def _killed_mid_download(server: SlowFileServer, url_path: str, payload: Path, root: Path) -> list[Path]:
    """Start a real download in a child, kill -9 it mid-body; returns the partial files it left."""
    url = server.add(url_path, payload)
    before = set((root / "tmp").glob("*")) if (root / "tmp").is_dir() else set()
    child = subprocess.Popen([sys.executable, "-c", FETCH, str(root), url])
    try:
        assert wait_until(lambda: any(p.stat().st_size > (1 << 20) for p in (root / "tmp").glob("*.part")
                                      if p not in before), 60) is not None
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    return sorted(set((root / "tmp").glob("*")) - before)


def test_a_killed_download_nobody_resumes_is_removed_after_a_day_and_a_fresh_one_kept(tmp_path: Path) -> None:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(random.Random(5).randbytes(4 << 20))
    root = tmp_path / "cache"
    with SlowFileServer() as server:
        server.throttle = 2e6
        old = _killed_mid_download(server, "/old/payload.bin", payload, root)
        fresh = _killed_mid_download(server, "/fresh/payload.bin", payload, root)
    assert sorted(p.suffix for p in old) == [".json", ".part"]
    day_ago = time.time() - 2 * 86400
    for path in old:
        os.utime(path, (day_ago, day_ago))  # the one simulated thing: a day passing
    Cache(root).obtain("another:key", _payload_producer(b"x"), FILE)
    assert not any(p.exists() for p in old), "a day-old partial of a killed run stayed in the cache"
    assert all(p.exists() for p in fresh), "a fresh partial (resumable by the next run) was removed"
