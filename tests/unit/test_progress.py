"""Download progress: the sizes and lines a user reads, and how often they come."""

from __future__ import annotations

import pytest

from pytest_flightctl_device.core.progress import Meter, human_bytes

MB = 10**6


class Clock:
    """A hand-driven clock: the meter's time passes only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def meter_with(total: int | None, **options: float | bool) -> tuple[Meter, Clock, list[tuple[float, str]]]:
    clock = Clock()
    said: list[tuple[float, str]] = []
    meter = Meter("disk.qcow2", total, lambda line: said.append((clock.now - 1000.0, line)),
                  clock=clock, **options)  # type: ignore[arg-type]
    return meter, clock, said


@pytest.mark.parametrize(("count", "text"), [
    (0, "0 B"),
    (1, "1 B"),
    (1023, "1023 B"),
    (1024, "1.0 KiB"),
    (1536, "1.5 KiB"),
    (10 * 1024**2, "10.0 MiB"),
    (100 * MB, "95.4 MiB"),
    (3 * 1024**3, "3.0 GiB"),
    (5000 * 1024**3, "5000.0 GiB"),  # no TiB: GiB is the largest unit
])
def test_human_bytes(count: int, text: str) -> None:
    assert human_bytes(count) == text


@pytest.mark.parametrize(("count", "text"), [
    (1024**2 - 1, "1.0 MiB"),
    (1024**3 - 1, "1.0 GiB"),
    (1023.6, "1.0 KiB"),
    (1024 * 1023.9, "1023.9 KiB"),
])
def test_human_bytes_never_shows_1024_of_a_unit(count: float, text: str) -> None:
    assert human_bytes(count) == text


def test_silent_for_the_delay_then_one_line_per_interval() -> None:
    meter, clock, said = meter_with(1000 * MB, interval=5.0, delay=2.0)
    meter.start()
    for _ in range(200):  # 1 MB every 0.1 s for 20 s
        clock.now += 0.1
        meter.advance(MB)
    times = [round(at, 1) for at, _ in said]
    assert times == [2.0, 7.0, 12.0, 17.0]


def test_silent_for_the_delay_even_without_start() -> None:
    meter, clock, said = meter_with(100 * MB, interval=5.0, delay=2.0)
    clock.now += 1.9
    meter.advance(MB)
    assert said == []
    clock.now += 0.1
    meter.advance(MB)
    assert len(said) == 1


def test_a_transfer_shorter_than_the_delay_says_nothing_at_all() -> None:
    meter, clock, said = meter_with(10 * MB, interval=5.0, delay=2.0)
    meter.start()
    for _ in range(10):
        clock.now += 0.15
        meter.advance(MB)
    meter.finish()
    assert said == []


def test_line_with_a_known_total() -> None:
    meter, clock, said = meter_with(100 * MB, interval=5.0, delay=2.0)
    meter.start()
    clock.now += 5.0
    meter.advance(50 * MB)
    assert [line for _, line in said] == ["disk.qcow2:  50% of 95.4 MiB, 10.0 MB/s ETA 5s"]


def test_eta_in_minutes_and_seconds() -> None:
    meter, clock, _ = meter_with(1000 * MB)
    meter.start()
    clock.now += 10.0
    meter.advance(20 * MB)  # 2 MB/s, 980 MB to go: 490 s
    assert meter.text() == "disk.qcow2:   2% of 953.7 MiB, 2.0 MB/s ETA 8m10s"


def test_bar_is_thirty_cells() -> None:
    meter, clock, _ = meter_with(100 * MB, bar=True)
    meter.start()
    clock.now += 1.0
    meter.advance(50 * MB)
    assert meter.text() == "disk.qcow2: [###############...............]  50% of 95.4 MiB, 50.0 MB/s ETA 1s"


def test_unknown_total_says_bytes_so_far_and_no_eta() -> None:
    meter, clock, _ = meter_with(None)
    meter.start()
    clock.now += 2.0
    meter.advance(1024**2)
    assert meter.text() == "disk.qcow2: 1.0 MiB, 0.5 MB/s"


def test_more_than_announced_stops_at_100_percent() -> None:
    meter, clock, _ = meter_with(10 * MB)
    meter.start()
    clock.now += 1.0
    meter.advance(12 * MB)
    assert meter.text() == "disk.qcow2: 100% of 9.5 MiB, 12.0 MB/s ETA 0s"


def test_resumed_transfer_counts_new_bytes_for_the_rate_and_all_bytes_for_the_percent() -> None:
    meter, clock, _ = meter_with(100 * MB)
    meter.start(already=50 * MB)
    clock.now += 2.0
    meter.advance(10 * MB)
    assert meter.text() == "disk.qcow2:  60% of 95.4 MiB, 5.0 MB/s ETA 8s"


def test_a_restart_after_a_report_does_not_report_early() -> None:
    """A retried download restarts the meter: the next line still waits a full interval."""
    meter, clock, said = meter_with(1000 * MB, interval=5.0, delay=2.0)
    meter.start()
    clock.now += 2.0
    meter.advance(MB)
    assert len(said) == 1
    clock.now += 1.0
    meter.start(already=MB)  # the connection dropped; resume
    for _ in range(60):
        clock.now += 0.1
        meter.advance(MB)
    assert [round(at, 1) for at, _ in said] == [2.0, 8.0]


def test_closing_line_after_a_report() -> None:
    meter, clock, said = meter_with(100 * MB, interval=5.0, delay=2.0)
    meter.start()
    for _ in range(40):  # 2.5 MB every 0.1 s for 4 s
        clock.now += 0.1
        meter.advance(2_500_000)
    meter.finish()
    assert [line for _, line in said][-1] == "disk.qcow2: 95.4 MiB done in 4.0 s (25.0 MB/s)"
    assert len(said) == 2  # the report at 2 s, then the closing line


def test_no_emitter_is_harmless() -> None:
    clock = Clock()
    meter = Meter("x", 10, None, delay=0.0, interval=0.0, clock=clock)
    meter.start()
    clock.now += 1.0
    meter.advance(5)
    meter.finish()
    assert meter.done == 5 and "50%" in meter.text()


def test_default_clock_is_real_time() -> None:
    said: list[str] = []
    meter = Meter("x", None, said.append, delay=0.0, interval=0.0)
    meter.start()
    meter.advance(1)
    meter.advance(1)
    meter.finish()
    assert len(said) == 3 and said[-1].startswith("x: 2 B done in ")
