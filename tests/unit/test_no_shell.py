"""No subprocess of the package runs through a host shell: a static check over the package's AST.

Paths, tags and URLs reach subprocesses (qemu-img, ssh, podman, git); through a shell any of
them could become a command. So: no shell=True (nor any non-False shell=), no os.system,
os.popen, subprocess.getoutput/getstatusoutput, asyncio's *_shell, and every subprocess call
gets an argv list, never a string built from input.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pytest_flightctl_device"
FORBIDDEN = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
             ("asyncio", "create_subprocess_shell"), ("os", "spawnlp"), ("os", "spawnvp"), ("pty", "spawn")}
RUNNERS = {"run", "Popen", "call", "check_call", "check_output"}


def _dotted(node: ast.expr) -> tuple[str, ...]:
    if isinstance(node, ast.Attribute):
        return (*_dotted(node.value), node.attr)
    if isinstance(node, ast.Name):
        return (node.id,)
    return ()


def _stringish(node: ast.expr) -> bool:
    """A str literal, an f-string, a % or + of strings, or str.format(): a command line, not an argv."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mod):
        return _stringish(node.left) or _stringish(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return _stringish(node.func.value)
    return False


def violations(source: str, filename: str = "<source>") -> list[str]:
    """Every shell use in `source`, as "file:line: what"."""
    found: list[str] = []
    tree = ast.parse(source, filename)
    imported: dict[str, tuple[str, str]] = {}  # `from os import system as s` -> s: (os, system)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                imported[alias.asname or alias.name] = (node.module, alias.name)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if len(name) == 1 and name[0] in imported:
            name = imported[name[0]]
        where = f"{filename}:{node.lineno}"
        if tuple(name[-2:]) in FORBIDDEN:
            found.append(f"{where}: {'.'.join(name)}()")
        for keyword in node.keywords:
            if keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant)
                                               and keyword.value.value is False):
                found.append(f"{where}: shell={ast.unparse(keyword.value)}")
        if len(name) >= 2 and name[-2] == "subprocess" and name[-1] in RUNNERS and node.args \
                and _stringish(node.args[0]):
            found.append(f"{where}: {'.'.join(name)}() given a command string, not an argv list")
    return found


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_package_never_runs_a_host_shell() -> None:
    files = package_files()
    assert len(files) > 20, f"found only {len(files)} modules under {PACKAGE}"
    found = [v for path in files for v in violations(path.read_text(), str(path.relative_to(PACKAGE.parent)))]
    assert found == []


def test_the_package_does_run_subprocesses_so_the_check_has_something_to_check() -> None:
    calls = sum(1 for path in package_files() for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Call) and _dotted(node.func)[-2:] in
                {("subprocess", r) for r in RUNNERS})
    assert calls >= 5


@pytest.mark.parametrize("snippet", [
    "import subprocess\nsubprocess.run(cmd, shell=True)",
    "import subprocess\nsubprocess.Popen(['a'], shell=flag)",
    "import os\nos.system('ls ' + path)",
    "from os import system\nsystem(x)",
    "from os import popen as p\np(x)",
    "import subprocess\nsubprocess.getoutput(f'qemu-img info {path}')",
    "import subprocess\nsubprocess.check_output(f'qemu-img info {path}')",
    "import subprocess\nsubprocess.run('podman load -i %s' % path)",
    "import subprocess\nsubprocess.call('git {}'.format(ref))",
    "import asyncio\nasyncio.create_subprocess_shell(cmd)",
])
def test_the_detector_catches_each_shell_form(snippet: str) -> None:
    assert violations(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "import subprocess\nsubprocess.run([qemu_img, 'info', str(path)], check=False)",
    "import subprocess\nsubprocess.run(argv, shell=False)",
    "import subprocess\nsubprocess.Popen([podman, 'system', 'service'])",
])
def test_the_detector_accepts_argv_lists(snippet: str) -> None:
    assert violations(snippet) == []
