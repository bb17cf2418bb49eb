"""Progress lines: done/total, rate, ETA, at most one per interval, and a final line."""

from __future__ import annotations

import pyarrow as pa

import rag_clean.telemetry.progress as progress
from rag_clean.telemetry.progress import ProgressLog
from rag_clean.config.registry import load_registry
from stage_helpers import dense


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_lines_come_at_most_once_per_interval_with_rate_and_eta():
    clock, lines = FakeClock(), []
    meter = ProgressLog("model-a", 1000, lines.append, interval_s=10, step_fraction=None, clock=clock)
    clock.now = 5
    meter.update(100, tokens=2000)
    assert lines == []  # under the interval: silent
    clock.now = 10
    meter.update(100, tokens=2000)
    assert lines == ["model-a: 200/1000 chunks (20.0%), 20 chunks/s, 400 tokens/s, ETA 40s"]
    clock.now = 12
    meter.update(100)
    assert len(lines) == 1
    clock.now = 50
    meter.update(700)
    meter.finish()
    assert lines[-1] == "model-a: 1000/1000 chunks (100.0%), 20 chunks/s, 80 tokens/s, took 50s"


def test_a_line_every_5_percent_of_rows_even_within_the_interval():
    clock, lines = FakeClock(), []
    meter = ProgressLog("m", 2000, lines.append, interval_s=10, clock=clock)  # 5% = 100 rows
    for _ in range(9):  # 9 x 40 rows in 3.6 s: marks 100, 200, 300 crossed once each
        clock.now += 0.4
        meter.update(40)
    # A mark gives a line only a second or more after the previous line (200 came 0.8 s after 120).
    assert [progress.parse_line(line).done for line in lines] == [120, 320]
    clock.now += 1.0
    meter.update(1000)  # one batch across ten marks: one line
    assert [progress.parse_line(line).done for line in lines][-1] == 1360 and len(lines) == 3
    clock.now += 20  # time rule still holds when rows are slow
    meter.update(1)
    assert len(lines) == 4 and lines[-1].startswith("m: 1361/2000 chunks (68.0%)")
    meter.update(639)
    meter.finish()
    assert progress.parse_line(lines[-1]) == progress.ProgressUpdate("m", 2000, 2000, "chunks")
    assert sum(1 for line in lines if progress.parse_line(line).done == 2000) == 1  # the end only once


def test_a_loop_faster_than_a_second_says_nothing():
    clock, lines = FakeClock(), []
    meter = ProgressLog("queries", 12, lines.append, unit="queries", clock=clock)  # 5% of 12 = every query
    for _ in range(12):
        clock.now += 0.02
        meter.update(1)
    meter.finish()
    assert lines == []  # "12/12 queries, took 0s" would be noise in the run log


def test_a_loop_of_a_second_or_more_says_it_once_at_the_end():
    clock, lines = FakeClock(), []
    meter = ProgressLog("queries", 12, lines.append, unit="queries", clock=clock)
    meter.update(12)  # one batch: no line on the way
    clock.now += 1.5
    meter.finish()
    assert len(lines) == 1 and lines[0].startswith("queries: 12/12 queries (100.0%)") and "took 2s" in lines[0]


def test_parse_line_reads_only_progress_lines():
    assert progress.parse_line("tiny-a: 3/60 chunks (5.0%), 20 chunks/s, ETA 3s") == ("tiny-a", 3, 60, "chunks")
    assert progress.parse_line("dense stage skipped: model not in ensemble_models") is None
    assert progress.parse_line("reused 10/12 chunks") is None


def test_dense_stage_reports_progress(tiny_registry_path, tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "DEFAULT_INTERVAL_S", 0.0)
    spec = load_registry(tiny_registry_path).get("tiny-a")
    texts = [f"install the gpu driver number {i} " * (1 + i % 7) for i in range(60)]
    chunks = pa.table({"chunk_id": [f"c{i}" for i in range(60)], "content_hash": [f"h{i}" for i in range(60)],
                       "text": texts})
    lines = []
    writer, record = dense(spec, chunks, tmp_path / "a.arrow", token_budget=256, progress=lines.append)
    writer.abort()
    assert record.computed == 60
    assert len(lines) >= 3, lines
    assert lines[0] == "loading model tiny-a"  # a phase of its own before the first batch (rag-clean shows it)
    assert lines[1].startswith("tiny-a: ") and "/60 chunks" in lines[1] and "ETA" in lines[1]
    assert lines[-1].startswith("tiny-a: 60/60 chunks (100.0%)") and "tokens/s" in lines[-1] and "took" in lines[-1]
