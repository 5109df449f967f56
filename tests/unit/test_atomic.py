"""atomic_write: readers see the old or the new file; a killed writer's temp is swept once it is dead."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_flightctl_device.core.atomic import atomic_write, sweep_temps, temp_path, write_atomic


def test_replaces_with_mode_and_leaves_no_temp(tmp_path: Path) -> None:
    dest = tmp_path / "f.json"
    dest.write_text("old")
    write_atomic(dest, "new", mode=0o600)
    assert dest.read_text() == "new"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_failure_keeps_the_old_file_and_removes_the_temp(tmp_path: Path) -> None:
    dest = tmp_path / "f"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(dest) as handle:
        handle.write(b"half")
        raise RuntimeError("writer failed")
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_sweep_removes_only_dead_writers_temps(tmp_path: Path) -> None:
    dest = tmp_path / "index.json"
    mine = temp_path(dest)
    mine.write_text("live writer")
    code = ("import sys; from pathlib import Path; from pytest_flightctl_device.core.atomic import temp_path;"
            "t = temp_path(Path(sys.argv[1])); t.write_text('killed'); print(t)")
    dead = Path(subprocess.run([sys.executable, "-c", code, str(dest)], check=True, capture_output=True,
                               text=True).stdout.strip())
    unrelated = tmp_path / ".index.json.notatemp"
    unrelated.write_text("x")
    assert dead.exists()
    assert sweep_temps(tmp_path, "other.json") == 0
    assert sweep_temps(tmp_path) == 1
    assert not dead.exists() and mine.exists() and unrelated.exists()
    os.unlink(mine)


def test_a_failed_check_keeps_the_old_file_and_removes_the_temp(tmp_path: Path) -> None:
    dest = tmp_path / "bundle.tar"
    dest.write_bytes(b"old")
    seen: list[Path] = []

    def check(temp: Path) -> None:
        seen.append(temp)
        assert temp.read_bytes() == b"truncated"  # synced and complete before the check runs
        raise ValueError("not a bundle")

    with pytest.raises(ValueError, match="not a bundle"), atomic_write(dest, check=check) as handle:
        handle.write(b"truncated")
    assert dest.read_bytes() == b"old" and seen and not seen[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.tar"]
