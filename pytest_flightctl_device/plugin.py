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
        "device(variant=..., memory_mib=..., vcpus=..., labels={...}): the device VM this test gets "
        "(labels: what enrolled_device approves it with).",
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
    lines = [f"flightctl-device: libvirt {', '.join(settings.libvirt_uri)}, accel {settings.accel}, "
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
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from pytest_flightctl_device.artifacts.session import Artifacts
    from pytest_flightctl_device.images.podman import PodmanSession


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
    errors fail the test in one line, without a traceback from inside the plugin.

    pytest.skip/fail are raised after the `except` block, not in it: raised inside, they carry the
    library error as their context and pytest prints the message twice ("During handling of the
    above exception, another exception occurred").
    """
    from pytest_flightctl_device.errors import DeviceError, MissingToolError

    try:
        return get()
    except MissingToolError as exc:
        skip = not settings.require
        message = str(exc) if skip else f"{exc} (--device-require is set, so this is an error)"
    except DeviceError as exc:
        skip, message = False, str(exc)
    if skip:
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def device_podman(request: pytest.FixtureRequest) -> Iterator[PodmanSession]:
    """This session's podman connection, made when first used (a build, a load); closing it stops a
    private podman service the session started, by its PID."""
    from pytest_flightctl_device.images.podman import PodmanSession

    with PodmanSession(settings_of(request.config)) as session:
        yield session


@pytest.fixture(scope="session")
def device_artifacts(request: pytest.FixtureRequest, device_podman: PodmanSession) -> Artifacts:
    """This session's artifacts; nothing is resolved, fetched or checked until a fixture asks."""
    from pytest_flightctl_device.artifacts.session import Artifacts

    config = request.config
    tty = bool(getattr(config.get_terminal_writer(), "hasmarkup", False))
    return Artifacts(settings_of(config), progress=_artifact_progress(config), interval=2.0 if tty else 5.0,
                     podman=device_podman)


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
    from pytest_flightctl_device.images.podman import LoadedImages


@pytest.fixture(scope="session")
def agent_images(request: pytest.FixtureRequest, agent_images_bundle: Path,
                 device_podman: PodmanSession) -> LoadedImages:
    """The bundle's images loaded into podman, at most once per podman store (a file lock serialises
    workers; a store that already holds every tag with the same image ID is not loaded again).

    Returns a LoadedImages: `.tags` lists `<image_repo>:<variant>-<tag>` in variant order,
    `images["v2"]` gives one variant's tag, `.image_ids` maps tag -> image ID.
    """
    from pytest_flightctl_device.images import podman

    settings = settings_of(request.config)
    progress = _artifact_progress(request.config)
    return _guarded(settings, lambda: podman.load_bundle(device_podman.get(), agent_images_bundle, settings,
                                                          settings.locks_dir, progress))


# -- device VMs: agent_config, device_vm_factory, device_vm ------------------------------------

if TYPE_CHECKING:
    from pytest_flightctl_device.devices.agent import AgentConfig
    from pytest_flightctl_device.devices.factory import BootStats, DeviceVMFactory
    from pytest_flightctl_device.devices.vm import DeviceVM

RUN_ID_KEY = "fcdev_run_id"
_REPORTS_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()
_FACTORY_KEY = pytest.StashKey["DeviceVMFactory"]()
_STATS_KEY = pytest.StashKey["BootStats"]()


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
    from pytest_flightctl_device.devices.factory import DeviceVMFactory

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
    marker = request.node.get_closest_marker("device")
    node = request.node.nodeid
    remap = _remap_for(request)
    vm = _guarded(settings_of(request.config), lambda: device_vm_factory.create(
        device_vm_factory.request_from_marker(marker.args, marker.kwargs) if marker else None, for_test=node,
        registry=remap))
    yield vm
    failed = any(report.failed for report in request.node.stash.get(_REPORTS_KEY, {}).values())
    kept = device_vm_factory.finish(vm, failed=failed)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if kept and reporter is not None:
        reporter.write_line(f"flightctl-device: kept {vm.name} for {node}; {kept}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report gets each device's console tail, domain XML and redacted user-data."""
    report: pytest.TestReport = yield  # type: ignore[assignment]
    item.stash.setdefault(_REPORTS_KEY, {})[report.when] = report
    factory = item.config.stash.get(_FACTORY_KEY, None)
    if factory is None:
        return report  # type: ignore[return-value]
    if report.failed:
        enrolled = item.stash.get(_ENROLLED_KEY, None)
        if enrolled is not None:
            report.sections.extend(enrolled.sections())
        for vm in factory.made_for(item.nodeid):
            report.sections.append((f"flightctl-device {vm.name} console (last 50 lines)", vm.console_tail()))
            report.sections.append((f"flightctl-device {vm.name} domain XML", vm.domain_xml()))
            report.sections.append((f"flightctl-device {vm.name} user-data (secrets redacted)",
                                    vm.user_data_redacted()))
    if report.when == "teardown":
        factory.forget(item.nodeid)
    return report  # type: ignore[return-value]


def _stats(config: pytest.Config) -> BootStats:
    from pytest_flightctl_device.devices.factory import BootStats

    return config.stash.setdefault(_STATS_KEY, BootStats())


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Collect this process's boot figures; an xdist worker hands them to the controller."""
    factory = session.config.stash.get(_FACTORY_KEY, None)
    if factory is None:
        return
    stats = _stats(session.config)
    stats.merge(factory.stats.as_data())
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["fcdev_boots"] = stats.as_data()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist controller: add a finished worker's boot figures to the run's."""
    figures = getattr(node, "workeroutput", {}).get("fcdev_boots")
    if figures:
        _stats(node.config).merge(figures)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    stats = terminalreporter.config.stash.get(_STATS_KEY, None)
    summary = stats.summary() if stats is not None else None
    if summary:
        terminalreporter.write_line(f"flightctl-device: {summary}")


# -- registry: agent_registry ---------------------------------------------------------------------

if TYPE_CHECKING:
    from pytest_flightctl_device.devices.remap import RegistryRemap
    from pytest_flightctl_device.images.publish import AgentRegistry


@pytest.fixture(scope="session")
def agent_registry(request: pytest.FixtureRequest, agent_images_bundle: Path) -> Iterator[AgentRegistry]:
    """Every variant of the bundle in a registry the devices pull from, pushed once per registry.

    --device-registry HOST:PORT[/NAMESPACE] names an existing one; else a private registry on
    127.0.0.1 (one per cache dir, shared by workers and runs). A test that requests this fixture
    gets devices whose registries.conf.d remaps --device-image-repo's namespace to it, so
    `device_vm.image("v2")` (`<image_repo>:v2-<tag>`) pulls from it; `.ref(variant)`, `.digests`.
    """
    from pytest_flightctl_device.images import publish

    settings = settings_of(request.config)
    progress = _artifact_progress(request.config)
    held = _guarded(settings, lambda: publish.open_registry(settings, agent_images_bundle, progress))
    try:
        yield held
    finally:
        held.release()


def _remap_for(request: pytest.FixtureRequest) -> RegistryRemap | None:
    """agent_registry's remap when this test requested it (set up first, so it fails before a boot)."""
    if "agent_registry" not in request.fixturenames:
        return None
    held: AgentRegistry = request.getfixturevalue("agent_registry")
    return held.remap


# -- the flightctl service: flightctl_api, enrolled_device -----------------------------------------

if TYPE_CHECKING:
    from pytest_flightctl_device.service.connection import ServiceSettings
    from pytest_flightctl_device.service.enrolled import EnrolledDevice
    from pytest_flightctl_device.service.lifecycle import Enrollment

_SERVICE_KEY = pytest.StashKey["tuple[ServiceSettings | None, str | None]"]()
_ENROLLED_KEY: pytest.StashKey[Enrollment] = pytest.StashKey()


def _service(config: pytest.Config) -> tuple[ServiceSettings | None, str | None]:
    """The service settings, resolved and checked once per process: (settings, None) or (None, why).
    xdist workers resolve the same options, FLIGHTCTL_TOKEN and client.yaml, so they share them."""
    cached = config.stash.get(_SERVICE_KEY, None)
    if cached is None:
        from pytest_flightctl_device.errors import DeviceError
        from pytest_flightctl_device.service import connection

        try:
            service = connection.resolve(settings_of(config), os.environ)
            connection.check(service)
            cached = (service, None)
        except DeviceError as exc:
            cached = (None, str(exc))
        config.stash[_SERVICE_KEY] = cached
    return cached


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The flightctl service is checked once, before any device boots, when a collected test needs it."""
    if any("flightctl_api" in getattr(item, "fixturenames", ()) for item in items):
        _service(config)


@pytest.fixture(scope="session")
def flightctl_api(request: pytest.FixtureRequest) -> Iterator[Any]:
    """flightctl-client's ApiClient for the service (--device-flightctl-api and FLIGHTCTL_TOKEN, or
    the client.yaml of `flightctl login`), checked once through its version endpoint."""
    service, error = _service(request.config)
    if service is None:
        pytest.fail(error or "the flightctl service is not configured", pytrace=False)
    from pytest_flightctl_device.service.connection import api_client

    with api_client(service) as client:
        yield client


@pytest.fixture
def enrolled_device(request: pytest.FixtureRequest, flightctl_api: Any,
                    device_vm_factory: DeviceVMFactory) -> Iterator[EnrolledDevice]:
    """A device booted, approved with a test-id label (plus the marker's labels=) and Online.

    Teardown stops the VM first, then deletes this test's Device (by its test-id label) and its
    EnrollmentRequest (by name), nothing else (service/lifecycle.py).
    """
    from pytest_flightctl_device.service.lifecycle import Enrollment, test_id

    settings = settings_of(request.config)
    marker = request.node.get_closest_marker("device")
    wanted = _guarded(settings, lambda: device_vm_factory.request_from_marker(marker.args, marker.kwargs)
                      if marker else device_vm_factory.request())
    lease = request.node.stash[_ENROLLED_KEY] = Enrollment(
        device_vm_factory, flightctl_api, test_id(_run_id(request.config), request.node.nodeid))
    try:
        yield _guarded(settings, lambda: lease.start(wanted, for_test=request.node.nodeid,
                                                     registry=_remap_for(request)))
        lease.finish(failed=any(report.failed for report in request.node.stash.get(_REPORTS_KEY, {}).values()))
    finally:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if lease.kept and reporter is not None:
            reporter.write_line(f"flightctl-device: kept {lease.kept} for {request.node.nodeid}")

