"""rag-clean's progress display, fed by a real run's Dagster events: a bar per step that reaches 100%
on a terminal, plain lines when stdout is not a TTY."""

from __future__ import annotations

import io

import dagster as dg
from rich.console import Console

from rag_clean_assets.definitions import EMBED_JOB_NAME, build_definitions
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


def test_plain_lines_when_not_a_tty(pipeline):
    out = io.StringIO()  # not a TTY
    view = RunProgress({}, stream=out)
    assert view.tty is False and view.progress is None
    assert _run(pipeline, view)
    lines = out.getvalue().splitlines()
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


def test_bar_per_step_reaches_100_percent_on_a_terminal(pipeline):
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
