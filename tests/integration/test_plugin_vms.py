"""The plugin as a user runs it: pytest sessions (pytester subprocesses) that ask for device_vm."""

from __future__ import annotations

import functools
import http.server
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pytest_flightctl_device.devices import janitor
from pytest_flightctl_device.devices.domain import open_libvirt
from pytest_flightctl_device.settings import Settings
from tests.support.helpers import serving

pytest_plugins = ["pytester"]


@pytest.fixture
def tiny_args(tiny_guest: Path) -> list[str]:
    return ["-p", "no:cacheprovider", f"--device-qcow2={tiny_guest}", "--device-network", "isolated",
            "--device-memory-mib", "256", "--device-vcpus", "1"]


def test_two_workers_boot_at_once(pytester: pytest.Pytester, tiny_args: list[str], tmp_path: Path) -> None:
    out = tmp_path / "vms"
    out.mkdir()
    pytester.makepyfile(f"""
        import json, pytest

        @pytest.mark.parametrize("n", [1, 2])
        @pytest.mark.device(memory_mib=300)
        def test_device(device_vm, n):
            assert device_vm.run("hostname").stdout.strip() == device_vm.name
            assert "<memory unit='KiB'>307200</memory>" in device_vm.domain_xml()
            with open("{out}/%d.json" % n, "w") as handle:
                json.dump({{"name": device_vm.name, "port": device_vm.ssh_port}}, handle)
    """)
    result = pytester.runpytest_subprocess(*tiny_args, "-n", "2")
    result.assert_outcomes(passed=2)
    vms = [json.loads((out / f"{n}.json").read_text()) for n in (1, 2)]
    assert vms[0]["name"] != vms[1]["name"] and vms[0]["port"] != vms[1]["port"]
    run_ids = {vm["name"].split("-")[1] for vm in vms}
    workers = {vm["name"].split("-")[2] for vm in vms}
    assert len(run_ids) == 1 and workers == {"gw0", "gw1"}
    result.stdout.fnmatch_lines(["*flightctl-device: 2 device VM(s) booted, ready after *acceleration: *"])


def test_failure_report_has_console_xml_and_redacted_user_data(pytester: pytest.Pytester,
                                                               tiny_args: list[str]) -> None:
    pytester.makepyfile("""
        def test_fails(device_vm, agent_config):
            print("KEYS", *agent_config.secrets()[:1])
            assert device_vm.run("echo 1").stdout == "2"
    """)
    result = pytester.runpytest_subprocess(*tiny_args, "-s")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "console (last 50 lines)" in text and "fcdev-ready" in text
    assert "domain XML" in text and "restrict=on" in text
    assert "user-data (secrets redacted)" in text and "<redacted:" in text
    match = re.search(r"KEYS (\S+)", text)
    assert match, "the inner test printed no secret"
    assert text.count(match.group(1)) == 1  # only where the test itself printed it


def test_keep_vm_keeps_a_failed_tests_vm(pytester: pytest.Pytester, tiny_args: list[str],
                                         device_settings: Settings) -> None:
    pytester.makepyfile("""
        def test_fails(device_vm):
            assert False, "look at me"

        def test_passes(device_vm):
            pass
    """)
    result = pytester.runpytest_subprocess(*tiny_args, "--device-keep-vm")
    result.assert_outcomes(failed=1, passed=1)
    kept = [line for line in result.stdout.lines if "flightctl-device: kept" in line]
    assert len(kept) == 1 and "log in with: ssh -i " in kept[0]
    name = kept[0].split("kept ")[1].split()[0]
    conn = open_libvirt(device_settings.libvirt_uri[0])
    try:
        names = {dom.name() for dom in conn.listAllDomains()}
        assert name in names  # alive after its pytest exited
        assert sum(n.startswith(name.rsplit("-", 1)[0]) for n in names) == 1  # the passing one is gone
        janitor.sweep(conn, device_settings.workdir)
        assert name in {dom.name() for dom in conn.listAllDomains()}  # kept VMs are spared
        conn.lookupByName(name).destroy()  # what the user does when done (we started it)
        swept = janitor.sweep(conn, device_settings.workdir)
        assert any(path.name == name.rsplit("-", 1)[1] for path in swept.paths)
    finally:
        conn.close()


def test_missing_libvirt_skips_locally_and_errors_under_require(
        pytester: pytest.Pytester, tiny_args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLIGHTCTL_DEVICE_REQUIRE", raising=False)
    pytester.makepyfile("def test_device(device_vm):\n    pass\n")
    args = [*tiny_args, "--device-libvirt-uri", "qemu+unix:///system?socket=/nonexistent/sock", "-rs"]
    skipped = pytester.runpytest_subprocess(*args)
    skipped.assert_outcomes(skipped=1)
    skipped.stdout.fnmatch_lines(["*cannot connect to libvirt at qemu+unix:///system?socket=/nonexistent/sock*"])
    required = pytester.runpytest_subprocess(*args, "--device-require")
    required.assert_outcomes(errors=1)
    required.stdout.fnmatch_lines(["*cannot connect to libvirt*--device-require is set, so this is an error*"])


def test_bad_options_stop_before_anything_runs(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile("def test_device(device_vm):\n    pass\n")
    result = pytester.runpytest_subprocess("--device-memory-mib", "-5")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--device-memory-mib '-5' must be greater than zero*"])
    result = pytester.runpytest_subprocess("--device-qcow2", str(tmp_path / "missing.qcow2"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--device-qcow2 *missing.qcow2' is not an existing file*"])


def test_a_file_that_is_not_a_qcow2(pytester: pytest.Pytester, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 65536)
    pytester.makepyfile("def test_device(device_vm):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--device-qcow2={raw}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*{raw}*qcow2*"])
    assert "fcdev-" not in result.stdout.str()  # no VM was booted


def test_a_path_option_that_moved_rootdir_is_flagged(pytester: pytest.Pytester, tiny_guest: Path) -> None:
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--device-qcow2", str(tiny_guest))
    result.stdout.fnmatch_lines(["*pytest took its rootdir from the value of --device-qcow2*"
                                 "write --device-qcow2=PATH*"])
    clean = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--device-qcow2={tiny_guest}")
    assert "took its rootdir" not in clean.stdout.str()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _file_server(directory: Path) -> Iterator[int]:
    """A loopback HTTP server over `directory`: a missing file is a real 404."""
    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                 functools.partial(_Quiet, directory=str(directory)))) as port:
        yield port


def _printed_once(text: str, message: str) -> None:
    assert text.count(message) == 1, text
    assert "During handling of the above exception" not in text, text


def test_a_fixture_error_is_printed_once(pytester: pytest.Pytester, tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    pytester.makepyfile("def test_device(agent_qcow2):\n    pass\n")
    with _file_server(served) as port:
        url = f"http://127.0.0.1:{port}/missing.qcow2"
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rN", f"--device-qcow2={url}",
                                               f"--device-cache-dir={tmp_path / 'cache'}")
    result.assert_outcomes(errors=1)
    _printed_once(result.stdout.str(), f"{url} answered HTTP 404")


def test_a_bad_marker_argument_is_one_clear_error(pytester: pytest.Pytester, tiny_args: list[str]) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.device(memory=512)
        def test_device(device_vm):
            pass
    """)
    result = pytester.runpytest_subprocess(*tiny_args, "-rN")
    result.assert_outcomes(errors=1)
    from pytest_flightctl_device.devices.factory import MARKER_ARGS

    assert {"memory_mib", "vcpus", "variant", "fresh", "labels"} <= set(MARKER_ARGS)
    _printed_once(result.stdout.str(), "@pytest.mark.device got unexpected arguments ['memory']; use keyword "
                                       f"arguments from {', '.join(MARKER_ARGS)}.")
    assert "fcdev-" not in result.stdout.str()  # nothing booted
