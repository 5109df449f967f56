"""flightctl-device options: every subcommand takes its knobs from KNOBS, resolves them through
Settings.resolve, and names a bad value by the flag (or env var) the user actually used."""

from __future__ import annotations

import argparse
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_flightctl_device.cli import COMMANDS, build_parser, main
from pytest_flightctl_device.cli.options import SHORT, flags_of, render
from pytest_flightctl_device.settings import ENV_PREFIX, KNOBS, knob


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's FLIGHTCTL_DEVICE_* (e.g. REQUIRE=1 under CI) must not change these answers."""
    import os

    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_fetch_repo_names_the_flag_typed(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, "fetch", "--run", "1", "--repo", "bad repo")
    assert code == 1
    assert err == ("flightctl-device: --repo 'bad repo' is not OWNER/NAME; give a repository such as "
                   "flightctl/flightctl.\n")


def test_build_jobs_names_the_flag_typed(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, "build", "--jobs", "0")
    assert code == 1
    assert err == ("flightctl-device: --jobs '0' must be greater than zero; give a positive whole number.\n")


def test_fetch_pr_is_parsed_by_the_knob(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "fetch", "--pr", "abc")[1] == (
        "flightctl-device: --pr 'abc' is not a whole number; give a positive whole number.\n")


def test_fetch_url_and_sha256_are_named_as_typed(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _, err = run(capsys, "fetch", "--url", "https://127.0.0.1:1/d.qcow2", "--sha256", "xyz",
                 "--cache-dir", str(tmp_path))
    assert err.startswith("flightctl-device: --sha256 'xyz' is not a sha256 digest")
    _, err = run(capsys, "fetch", "--url", "ftp://nowhere/b.tar", "--cache-dir", str(tmp_path))
    assert err.startswith("flightctl-device: --url 'ftp://nowhere/b.tar' is not an existing file")


def test_env_var_is_named_as_the_env_var(capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLIGHTCTL_DEVICE_BUILD_JOBS", "0")
    _, err = run(capsys, "build")
    assert err.startswith("flightctl-device: FLIGHTCTL_DEVICE_BUILD_JOBS (for --jobs) '0' must be greater")
    _, err = run(capsys, "doctor")  # doctor has no flag for it: the env var is the only name it has here
    assert err.startswith("flightctl-device: FLIGHTCTL_DEVICE_BUILD_JOBS '0' must be greater")


def test_combination_errors_use_this_subcommands_flags(capsys: pytest.CaptureFixture[str],
                                                       tmp_path: Path) -> None:
    _, err = run(capsys, "boot", "--agent-certs", str(tmp_path))
    assert err == ("flightctl-device: --agent-certs needs --enrollment-server; "
                   "give the enrollment service URL (https://host:port).\n")


@pytest.fixture
def not_found_api() -> Iterator[str]:
    """A loopback 'GitHub API' that knows no run at all."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"message": "Not Found"}'
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_library_error_is_rendered_in_the_subcommands_flags(capsys: pytest.CaptureFixture[str],
                                                            not_found_api: str, tmp_path: Path) -> None:
    """GitHubSource says --device-github-repo; fetch's user typed --repo, so that is what they read."""
    code, err = run(capsys, "fetch", "--run", "4242", "--repo", "o/n", "--api-url", not_found_api,
                    "--cache-dir", str(tmp_path))
    assert code == 1
    assert "GitHub found no" in err and "--repo" in err
    assert "--device-" not in err


@pytest.mark.parametrize(("message", "flags", "expected"), [
    ("check --device-github-repo", {"github_repo": "--repo"}, "check --repo"),
    ("give --device-github-run/pr/ref", {"github_run": "--run", "github_pr": "--pr", "github_ref": "--ref"},
     "give --run/--pr/--ref"),
    ("give --device-github-run/pr/ref", {}, "give FLIGHTCTL_DEVICE_GITHUB_RUN/FLIGHTCTL_DEVICE_GITHUB_PR/"
                                            "FLIGHTCTL_DEVICE_GITHUB_REF"),
    ("raise --device-max-vms or run fewer", {}, "raise FLIGHTCTL_DEVICE_MAX_VMS or run fewer"),
    ("--device-build-jobs and --device-build", {"build_jobs": "--jobs"}, "--jobs and FLIGHTCTL_DEVICE_BUILD"),
    ("--device-qcow2=URL", {"qcow2": "--url"}, "--url=URL"),
    ("--device-no-such-knob stays", {}, "--device-no-such-knob stays"),
    ("FLIGHTCTL_DEVICE_ACCEL (for --device-accel) 'x'", {}, "FLIGHTCTL_DEVICE_ACCEL 'x'"),
    ("FLIGHTCTL_DEVICE_ACCEL (for --device-accel) 'x'", {"accel": "--accel"},
     "FLIGHTCTL_DEVICE_ACCEL (for --accel) 'x'"),
])
def test_render(message: str, flags: dict[str, str], expected: str) -> None:
    assert render(message, flags) == expected


def test_render_with_the_pytest_spelling_changes_nothing() -> None:
    """The pytest front's flags are the --device-NAME the messages are written in."""
    pytest_flags = {spec.attr: spec.cli for spec in KNOBS}
    text = " ".join(f"{spec.cli} and FLIGHTCTL_DEVICE_X (for {spec.cli})" for spec in KNOBS)
    assert render(text, pytest_flags) == text


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield name, child
                yield from ((f"{name} {n}", c) for n, c in _subparsers(child))


def test_every_knob_flag_is_the_knobs_own_option() -> None:
    """Each knob a subcommand takes is stored under the knob's attr, with the knob's help and parser."""
    parsers = dict(_subparsers(build_parser()))
    assert set(COMMANDS) <= set(parsers)
    for name, parser in parsers.items():
        flags = parser.get_default("knob_flags") or {}
        options = {opt: action for action in parser._actions for opt in action.option_strings}
        for attr, flag in flags.items():
            knob(attr)  # a real knob
            assert flag in options, (name, attr, flag)
            action = options[flag]
            if action.dest == attr:  # registered from KNOBS (not one fed indirectly, like fetch --url)
                assert flag == SHORT.get(attr, f"--{knob(attr).name}")
                assert action.default is None and "--device-" not in (action.help or "")


@pytest.mark.parametrize("argv", [
    # every flag the CLI had before the options came from KNOBS still parses
    ["fetch", "--pr", "1", "--what", "qcow2", "--repo", "o/n", "--api-url", "http://x", "--workflow", "w.yaml",
     "--bundle-artifact", "b", "--qcow2-artifact", "q", "--cache-dir", "c", "--out", "o"],
    ["fetch", "--run", "1"], ["fetch", "--ref", "main"],
    ["fetch", "--url", "http://x/d.qcow2", "--kind", "qcow2", "--sha256", "ab"],
    ["cache", "ls", "--cache-dir", "c"], ["cache", "verify", "--cache-dir", "c"],
    ["cache", "prune", "--max-gb", "0", "--cache-dir", "c"],
    ["build", "--rpms", "r", "--tag", "t", "--image-repo", "i", "--variants", "base", "--podman-url", "u",
     "--containerfiles", "c", "--base-image", "b", "--jobs", "2"],
    ["bundle", "-o", "b.tar", "--tag", "t", "--image-repo", "i", "--variants", "base", "--podman-url", "u"],
    ["qcow2", "--output", "d.qcow2", "--tag", "t", "--image-repo", "i", "--variants", "base", "--podman-url", "u",
     "--bib-image", "b", "--bib-config", "c", "--bib-timeout", "9", "--cache-dir", "c"],
    ["load", "b.tar", "--tag", "t", "--image-repo", "i", "--variants", "base", "--podman-url", "u",
     "--cache-dir", "c"],
    ["boot", "--qcow2", "d", "--agent-config", "a", "--agent-certs", "c", "--enrollment-server", "e",
     "--accel", "tcg", "--libvirt-uri", "u", "--memory-mib", "1", "--vcpus", "1", "--boot-timeout", "1",
     "--workdir", "w", "--network", "user", "--host-forward", "1", "--host-forward", "2", "--firmware", "bios",
     "--cache-dir", "c", "--max-vms", "1", "--run", "true"],
    ["doctor", "--libvirt-uri", "u", "--accel", "auto", "--cache-dir", "c", "--workdir", "w"],
])
def test_todays_flags_still_parse(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert callable(args.func) and flags_of(args)


def test_help_names_this_subcommands_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fetch", "--help"])
    out = capsys.readouterr().out
    assert "Repository of --run/--pr/--ref" in out and "--device-" not in out
    with pytest.raises(SystemExit):
        main(["boot", "--help"])
    assert "(needs --enrollment-server)" in capsys.readouterr().out
