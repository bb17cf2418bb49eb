"""rag-clean's progress display, fed by a real run's Dagster events: a bar per step that reaches 100%
on a terminal, plain lines when stdout is not a TTY."""

from __future__ import annotations

import io
import warnings

import dagster as dg
import pytest
from rich.console import Console
from transformers.utils import logging as transformers_logging

from rag_clean_assets.definitions import EMBED_JOB_NAME, build_definitions
import rag_clean.telemetry.progress as progress
from rag_clean.telemetry.progress import loading_line
from rag_clean_assets.run_progress import LOGGER_KEY, RunProgress, asset_steps, logger_def
from resources.gpu_lease import GpuLeaseResource
from resources.settings import EmbedderSettingsResource


def _run(pipeline, view: RunProgress, collection: str = "demo") -> bool:
    defs = build_definitions(str(pipeline.registry_path), automation=False, data_root=str(pipeline.data_root),
                             storage_root=str(pipeline.storage_root),
                             settings=EmbedderSettingsResource(dotenv_file=str(pipeline.data_root / "no.env")),
                             gpu_lease=GpuLeaseResource(lock_dir=str(pipeline.lock_dir)),
                             loggers={"console": dg.colored_console_logger, LOGGER_KEY: logger_def(view)})
    view.step_names = asset_steps(defs)
    pipeline.instance.add_dynamic_partitions("collections", [collection])
    with view:
        view.start_collection(collection)
        result = defs.resolve_job_def(EMBED_JOB_NAME).execute_in_process(
            partition_key=collection, instance=pipeline.instance, raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}, LOGGER_KEY: {}}})
        view.finish_collection(result.success)
    return result.success


@pytest.fixture
def every_progress_line(monkeypatch):
    """The tiny encodes take well under a second, which says no progress line (rag_clean.telemetry.progress):
    here the bars must follow lines as they do on real collections."""
    monkeypatch.setattr(progress, "MIN_STEP_GAP_S", 0.0)


def test_plain_lines_when_not_a_tty(pipeline, capfd, every_progress_line):
    # As in a process that imported transformers before rag_clean_assets quieted it (a notebook, a benchmark):
    # its "Loading weights" bars are on until the engine's model loading turns them off.
    with warnings.catch_warnings():  # huggingface_hub warns that its environment variable wins over this call
        warnings.simplefilter("ignore")
        transformers_logging.enable_progress_bar()
    out = io.StringIO()  # not a TTY
    view = RunProgress({}, stream=out)
    assert view.tty is False and view.progress is None
    assert _run(pipeline, view)
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.out + captured.err + out.getvalue()
    lines = out.getvalue().splitlines()
    # the model load is a phase of its own, said before the encode's first progress line
    loading = lines.index("demo dense_embeddings/tiny_a: loading model tiny-a")
    assert loading < min(i for i, line in enumerate(lines) if line.startswith("demo dense_embeddings/tiny_a: tiny-a: "))
    steps = list(view.step_names.values())
    assert {"chunks", "dense_embeddings/tiny_a", "dense_embeddings/tiny_b", "fused_embeddings", "sparse_vectors",
            "queries", "reranked"} <= set(steps)
    assert lines[0] == f"demo: {len(steps)} steps"
    for name in steps:
        assert f"demo {name}: started" in lines
        assert any(line.startswith(f"demo {name}: done (") for line in lines), name
    # encode progress lines of the dense steps come through, with done/total
    assert any(line.startswith("demo dense_embeddings/tiny_a: tiny-a: ") and "/" in line for line in lines)
    assert lines[-1] == f"demo: finished ({len(steps)}/{len(steps)} steps done)"
    assert all(view.percent(key) == 100.0 for key in view.step_names)
    assert "\x1b[" not in out.getvalue()  # no terminal control codes in a log


def test_bar_per_step_reaches_100_percent_on_a_terminal(pipeline, every_progress_line):
    console = Console(record=True, file=io.StringIO(), force_terminal=True, width=140)
    view = RunProgress({}, tty=True, console=console)
    shown: dict[str, float] = {}
    finish = view.finish_collection

    def capture(ok):  # the live bars just before the collection's bars leave the display
        shown.update({t.description.strip(): t.percentage for t in view.progress.tasks})
        dense_key = next(k for k, n in view.step_names.items() if n == "dense_embeddings/tiny_a")
        shown["dense rows"] = view.steps[dense_key].total
        finish(ok)

    view.finish_collection = capture
    assert _run(pipeline, view)
    names = list(view.step_names.values())
    for name in names:
        assert shown[f"demo · {name}"] == 100.0, name
    assert shown["[bold]demo[/bold] steps"] == 100.0
    assert shown["dense rows"] > 1  # the dense bar counted the chunks encoded, not just the step
    assert view.finished["demo"] == {key: 100.0 for key in view.step_names}
    assert view.progress.tasks == []  # the live display only holds the running collection
    assert f"demo: finished ({len(names)}/{len(names)} steps done)" in console.export_text()


def test_failed_step_is_marked_and_reported():
    out = io.StringIO()
    view = RunProgress({"chunks": "chunks", "queries": "queries"}, stream=out)
    view.start_collection("c")
    view.on_record("chunks", "STEP_START", "")
    view.on_record("chunks", "STEP_FAILURE", "")
    view.on_record("other_step", "STEP_START", "")  # not an asset step: ignored
    view.finish_collection(False)
    assert out.getvalue().splitlines() == ["c: 2 steps", "c chunks: started", "c chunks: FAILED",
                                           "c: FAILED (0/2 steps done)"]


def test_a_loading_model_is_a_phase_not_a_bar_at_zero():
    console = Console(record=True, file=io.StringIO(), force_terminal=True, width=140)
    view = RunProgress({"dense": "dense_embeddings/m"}, tty=True, console=console)
    with view:
        view.start_collection("c")
        view.on_record("dense", "STEP_START", "")
        view.on_record("dense", None, loading_line("minilm"))
        task = view.progress.tasks[1]
        assert task.description == "  c · dense_embeddings/m · loading model minilm"
        assert task.total is None  # rich pulses the bar instead of showing 0/1
        view.on_record("dense", None, "minilm: 32/145 chunks (22.1%), 3 chunks/s, ETA 38s")
        assert (task.description, task.completed, task.total) == ("  c · dense_embeddings/m", 32, 145)
        view.on_record("dense", None, loading_line("minilm"))  # e.g. a second model of the same step
        view.on_record("dense", "STEP_SUCCESS", "")  # no progress line followed (a reranker that did not load)
        assert (task.description, task.percentage) == ("  c · dense_embeddings/m", 100.0)
        view.finish_collection(True)
