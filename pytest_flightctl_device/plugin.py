"""pytest hooks and fixtures: thin wiring over the library's factories."""

from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from pytest_flightctl_device.errors import ConfigError
from pytest_flightctl_device.settings import KNOBS, Settings

SETTINGS_KEY = pytest.StashKey[Settings]()
_T = TypeVar("_T")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("flightctl-device", "flightctl device VMs and artifacts")
    for knob in KNOBS:  # the same registration as every flightctl-device subcommand's (cli/options)
        group.addoption(knob.cli, help=knob.help_text(), **knob.option_kwargs())
        parser.addini(knob.ini, help=f"{knob.help} (same as {knob.cli})", default=None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "device(variant=..., memory_mib=..., vcpus=...): the device VM this test gets.",
    )
    # Collect the raw values only: Settings.resolve is the one path, shared with flightctl-device.
    cli = {knob.attr: config.getoption(knob.cli) for knob in KNOBS}
    ini = {knob.attr: config.getini(knob.ini) for knob in KNOBS}
    try:
        config.stash[SETTINGS_KEY] = Settings.resolve(cli, os.environ, ini)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    _warn_if_rootdir_came_from_an_option(config)


def _warn_if_rootdir_came_from_an_option(config: pytest.Config) -> None:
    """pytest finds its rootdir before plugins add options, so `--device-qcow2 PATH` (with a
    space) can make PATH's directory the rootdir, and its ini file is then missed (pytest#8846)."""
    from pathlib import Path

    args = [str(arg) for arg in config.invocation_params.args]
    for knob, value in itertools.pairwise(args):
        if not knob.startswith("--device-") or not os.path.exists(value):
            continue
        path = Path(value).resolve()
        if config.rootpath in (path, path.parent) and config.rootpath != config.invocation_params.dir:
            config.issue_config_time_warning(pytest.PytestConfigWarning(
                f"pytest took its rootdir from the value of {knob} ({config.rootpath}); "
                f"write {knob}=PATH so pytest does not take PATH for a test path."), stacklevel=2)


def settings_of(config: pytest.Config) -> Settings:
    return config.stash[SETTINGS_KEY]


def pytest_report_header(config: pytest.Config) -> list[str]:
    settings = settings_of(config)
    lines = [f"flightctl-device: libvirt {settings.libvirt_uri}, accel {settings.accel}, "
             f"network {settings.network}, workdir {settings.workdir}"]
    if settings.agent_config is None and settings.agent_certs is None:
        lines.append("flightctl-device: agent config: a throwaway CA and enrollment certificate "
                     "(no real enrollment server; give --device-agent-config or --device-agent-certs)")
    if settings.accel == "auto":
        from pytest_flightctl_device.devices.accel import Accelerator

        verdict = Accelerator("auto", settings.accel_file).remembered()
        if verdict is not None:
            lines.append(f"flightctl-device: KVM {'works' if verdict.get('kvm') else 'does not work'} "
                         f"here (probed {verdict.get('checked')}); "
                         f"{'KVM' if verdict.get('kvm') else 'TCG'} will be used")
    return lines


@pytest.fixture(scope="session")
def device_settings(request: pytest.FixtureRequest) -> Settings:
    """The resolved settings of this run."""
    return settings_of(request.config)


# -- artifacts: agent_images_bundle, agent_qcow2 ----------------------------------------------

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from pytest_flightctl_device.artifacts.session import Artifacts


def _artifact_progress(config: pytest.Config) -> Callable[[str], None] | None:
    """Progress lines on the terminal reporter, written around output capture (never into a test)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return None

    def emit(text: str) -> None:
        import contextlib

        quiet = capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()
        with quiet:
            reporter.write_line(f"flightctl-device: {text}")

    return emit


def _guarded(settings: Settings, get: Callable[[], _T]) -> _T:
    """Run `get` for a fixture: a missing tool skips (an error under --device-require), other library
    errors fail the test in one line, without a traceback from inside the plugin."""
    from pytest_flightctl_device.errors import DeviceError, MissingToolError

    try:
        return get()
    except MissingToolError as exc:
        if settings.require:
            pytest.fail(f"{exc} (--device-require is set, so this is an error)", pytrace=False)
        pytest.skip(str(exc))
    except DeviceError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def device_artifacts(request: pytest.FixtureRequest) -> Artifacts:
    """This session's artifacts; nothing is resolved, fetched or checked until a fixture asks."""
    from pytest_flightctl_device.artifacts.session import Artifacts

    config = request.config
    tty = bool(getattr(config.get_terminal_writer(), "hasmarkup", False))
    return Artifacts(settings_of(config), progress=_artifact_progress(config), interval=2.0 if tty else 5.0)


@pytest.fixture(scope="session")
def agent_images_bundle(request: pytest.FixtureRequest, device_artifacts: Artifacts) -> Path:
    """The verified images bundle tar (`podman save -m`), fetched once for all workers."""
    return _guarded(settings_of(request.config), device_artifacts.bundle)


@pytest.fixture(scope="session")
def agent_qcow2(request: pytest.FixtureRequest, device_artifacts: Artifacts) -> Path:
    """The verified qcow2 disk image, fetched once for all workers; treat it as read-only."""
    return _guarded(settings_of(request.config), device_artifacts.qcow2)



# -- images: agent_images -----------------------------------------------------------------------

if TYPE_CHECKING:
    from collections.abc import Generator

    from pytest_flightctl_device.images.podman import LoadedImages


@pytest.fixture(scope="session")
def agent_images(request: pytest.FixtureRequest,
                 agent_images_bundle: Path) -> Generator[LoadedImages, None, None]:
    """The bundle's images loaded into podman, at most once per podman store (a file lock serialises
    workers; a store that already holds every tag with the same image ID is not loaded again).

    Returns a LoadedImages: `.tags` lists `<image_repo>:<variant>-<tag>` in variant order,
    `images["v2"]` gives one variant's tag, `.image_ids` maps tag -> image ID.
    """
    from pytest_flightctl_device.images import podman

    settings = settings_of(request.config)
    progress = _artifact_progress(request.config)

    def load() -> LoadedImages:
        conn = podman.shared(settings)
        return podman.load_bundle(conn, agent_images_bundle, settings, settings.locks_dir,
                                  progress)

    yield _guarded(settings, load)
    podman.close_shared()  # stops a private podman service this session started, by its PID


# -- device VMs: agent_config, device_vm_factory, device_vm ------------------------------------

if TYPE_CHECKING:
    from collections.abc import Iterator

    from pytest_flightctl_device.devices.agent import AgentConfig
    from pytest_flightctl_device.devices.vm import DeviceVM, DeviceVMFactory

RUN_ID_KEY = "fcdev_run_id"
_VMS_KEY = pytest.StashKey[list["DeviceVM"]]()
_REPORTS_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()
_FACTORY_KEY = pytest.StashKey["DeviceVMFactory"]()
_MARKER_ARGS = ("variant", "memory_mib", "vcpus", "runcmd", "boot_timeout")


def _run_id(config: pytest.Config) -> str:
    """One id per run, shared by xdist workers (the controller hands it over in workerinput)."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and RUN_ID_KEY in workerinput:
        return str(workerinput[RUN_ID_KEY])
    if not hasattr(config, "_fcdev_run_id"):
        import secrets

        config._fcdev_run_id = secrets.token_hex(4)  # type: ignore[attr-defined]
    return str(config._fcdev_run_id)  # type: ignore[attr-defined]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: object) -> None:
    """xdist controller: give every worker the run id, so VM names share it."""
    node.workerinput[RUN_ID_KEY] = _run_id(node.config)  # type: ignore[attr-defined]


def _worker(config: pytest.Config) -> str:
    workerinput = getattr(config, "workerinput", None)
    return str(workerinput["workerid"]) if workerinput else "main"


@pytest.fixture(scope="session")
def agent_config(request: pytest.FixtureRequest) -> AgentConfig:
    """The agent config and certs every device gets at boot; override it in a conftest to change."""
    from pytest_flightctl_device.devices.agent import load_agent_config, throwaway_agent_config

    settings = settings_of(request.config)
    if settings.agent_config is None and settings.agent_certs is None:
        return throwaway_agent_config()
    return _guarded(settings, lambda: load_agent_config(
        config=settings.agent_config, certs_dir=settings.agent_certs, server=settings.enrollment_server))


@pytest.fixture(scope="session")
def device_vm_factory(request: pytest.FixtureRequest, agent_config: AgentConfig,
                      agent_qcow2: Path) -> Iterator[DeviceVMFactory]:
    """Makes device VMs for this session (or xdist worker); destroys them all at the end."""
    from pytest_flightctl_device.devices.vm import DeviceVMFactory

    config = request.config
    settings = settings_of(config)
    factory = DeviceVMFactory(settings, base_image=agent_qcow2, agent=agent_config,
                              run_id=_run_id(config), worker=_worker(config),
                              log=_artifact_progress(config))
    _guarded(settings, factory.check)
    config.stash[_FACTORY_KEY] = factory
    yield factory
    factory.close()


@pytest.fixture
def device_vm(request: pytest.FixtureRequest, device_vm_factory: DeviceVMFactory) -> Iterator[DeviceVM]:
    """A fresh, ready device for this test; `@pytest.mark.device(...)` says which."""
    from pytest_flightctl_device.errors import ConfigError as _ConfigError

    marker = request.node.get_closest_marker("device")
    kwargs = dict(marker.kwargs) if marker else {}
    unknown = sorted(set(kwargs) - set(_MARKER_ARGS))
    settings = settings_of(request.config)
    if unknown or (marker and marker.args):
        given = unknown or list(marker.args if marker else ())
        pytest.fail(f"@pytest.mark.device got unexpected arguments {given}; "
                    f"use keyword arguments from {', '.join(_MARKER_ARGS)}.", pytrace=False)
    try:
        vm_request = device_vm_factory.request(**kwargs)
    except _ConfigError as exc:
        pytest.fail(str(exc), pytrace=False)
    vms = request.node.stash.setdefault(_VMS_KEY, [])
    try:
        vm = _guarded(settings, lambda: device_vm_factory.create(vm_request))
    finally:
        if device_vm_factory.last_failed is not None:
            vms.append(device_vm_factory.last_failed)
            device_vm_factory.last_failed = None
    vms.append(vm)
    yield vm
    reports = request.node.stash.get(_REPORTS_KEY, {})
    failed = any(report.failed for report in reports.values())
    if failed and settings.keep_vm:
        command = vm.keep()
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"flightctl-device: kept {vm.name} for {request.node.nodeid}; "
                                f"log in with: {command}  (remove it with: virsh destroy {vm.name})")
    else:
        device_vm_factory.release(vm)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report gets each device's console tail, domain XML and redacted user-data."""
    report: pytest.TestReport = yield  # type: ignore[assignment]
    item.stash.setdefault(_REPORTS_KEY, {})[report.when] = report
    if report.failed:
        for vm in item.stash.get(_VMS_KEY, []):
            report.sections.append((f"flightctl-device {vm.name} console (last 50 lines)", vm.console_tail()))
            report.sections.append((f"flightctl-device {vm.name} domain XML", vm.domain_xml()))
            report.sections.append((f"flightctl-device {vm.name} user-data (secrets redacted)",
                                    vm.user_data_redacted()))
    return report  # type: ignore[return-value]


_BOOTS_KEY = pytest.StashKey[dict[str, Any]]()


def _boots(config: pytest.Config) -> dict[str, Any]:
    return config.stash.setdefault(_BOOTS_KEY, {"times": [], "accel": set()})


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Collect this process's boot figures; an xdist worker hands them to the controller."""
    factory = session.config.stash.get(_FACTORY_KEY, None)
    if factory is None:
        return
    boots = _boots(session.config)
    boots["times"].extend(factory.boot_times)
    boots["accel"].update(factory.accel_used)
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["fcdev_boots"] = {"times": boots["times"], "accel": sorted(boots["accel"])}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist controller: add a finished worker's boot figures to the run's."""
    figures = getattr(node, "workeroutput", {}).get("fcdev_boots")
    if figures:
        boots = _boots(node.config)
        boots["times"].extend(figures["times"])
        boots["accel"].update(figures["accel"])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    boots = terminalreporter.config.stash.get(_BOOTS_KEY, None)
    if not boots or not boots["times"]:
        return
    times = sorted(boots["times"])
    accel = "; ".join(sorted(boots["accel"]))
    terminalreporter.write_line(
        f"flightctl-device: {len(times)} device VM(s) booted, ready after {times[0]:.1f}-{times[-1]:.1f} s; "
        f"acceleration: {accel}")
