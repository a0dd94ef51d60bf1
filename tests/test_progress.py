"""Progress lines: counts, rate and ETA, logged first, then at most every N seconds, and last."""

from __future__ import annotations

from melanoma.progress import Progress, format_seconds


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_first_then_every_n_seconds_then_last_with_rate_and_eta():
    clock, lines = FakeClock(), []
    progress = Progress(100, "scoring", lines.append, every_seconds=30, clock=clock)
    clock.now += 10
    progress.advance(10)  # the first update: logged (first rate and ETA)
    clock.now += 10
    progress.advance(10)  # 10 s after the last line: not logged
    clock.now += 25
    progress.advance(25)  # 35 s after it: logged
    clock.now += 55
    progress.advance(55)  # the last item: always logged
    assert lines == [
        "scoring: 10/100 (10%), 1/s, ETA 1m30s",
        "scoring: 45/100 (45%), 1/s, ETA 55s",
        "scoring: 100/100 (100%), 1/s, done in 1m40s",
    ]


def test_slow_items_read_as_seconds_each_and_details_are_appended():
    clock, lines = FakeClock(), []
    progress = Progress(30, "phase 1 epochs", lines.append, every_seconds=0, clock=clock)
    clock.now += 20
    progress.advance(detail="epoch 1/30: val_auroc 0.81")
    assert lines == ["phase 1 epochs: 1/30 (3%), 20s each, ETA 9m40s; epoch 1/30: val_auroc 0.81"]


def test_a_polled_count_that_did_not_move_logs_nothing_new():
    clock, lines = FakeClock(), []
    progress = Progress(4, "preprocess chunks", lines.append, every_seconds=0, clock=clock)
    progress.update(0)
    progress.update(0)
    clock.now += 2
    progress.update(2)
    assert lines == ["preprocess chunks: 0/4 (0%), 0/s", "preprocess chunks: 2/4 (50%), 1/s, ETA 2s"]


def test_format_seconds():
    assert [format_seconds(s) for s in (7, 177, 3840)] == ["7s", "2m57s", "1h04m"]
