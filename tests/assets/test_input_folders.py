"""Inputs at the Dagster edge (hardening issue, items 2, 3, 6): the chunks asset, the sensor, the
`collections` CLI and the IO manager report symlinks out of the data root, unusable folders and
broken stored files in one line each."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from rag_clean_assets import collections as cli
from rag_clean_assets.definitions import EMBED_JOB_NAME
from rag_clean_assets.partitions import COLLECTIONS_PARTITION
from rag_clean_assets.sensors import build_collection_sensor
from resources.paths import PathsResource

PROJECT = Path(__file__).resolve().parents[2]
DENSE_A = dg.AssetKey(["dense_embeddings", "tiny_a"])


def _failure_text(result) -> str:
    return "\n".join(e.step_failure_data.error.to_string() for e in result.get_step_failure_events())


@pytest.fixture
def data_root(tmp_path) -> Path:
    """ok/ (a collection), inlink -> ok (inside), outlink -> <tmp>/outside, 'bad name'/, .cache/."""
    root, outside = tmp_path / "data", tmp_path / "outside"
    for folder in (root / "ok", root / "bad name", root / ".cache", outside):
        folder.mkdir(parents=True)
    (root / "ok" / "a.md").write_text("# A\n\ntext\n")
    (root / "inlink").symlink_to(root / "ok", target_is_directory=True)
    (root / "outlink").symlink_to(outside, target_is_directory=True)
    (root / "stray.txt").write_text("a file, not a folder")
    return root


EXPECTED_SKIPPED_LINES = [
    "skipped folder '.cache' under the data root: hidden folder (name starts with '.')",
    "skipped folder 'bad name' under the data root: name is not usable as a collection name "
    "(letters, digits, '.', '_', '-'; no '..')",
]


def _outlink_line(root: Path) -> str:
    return (f"skipped folder 'outlink' under the data root: symlink to {(root.parent / 'outside').resolve()} "
            f"resolves outside the data root {root.resolve()}")


# --------------------------------------------------------------------------- chunks asset


def test_chunks_asset_counts_and_logs_symlink_out_of_the_data_root(pipeline, tmp_path):
    outside = tmp_path / "elsewhere.md"
    outside.write_text("# Elsewhere\n\nOUTSIDE-TEXT\n")
    (pipeline.data_root / "demo" / "hostname.md").symlink_to(outside)
    result = pipeline.materialize(selection=dg.AssetSelection.assets("chunks"))
    assert result.success
    reason = f"symlink hostname.md -> {outside.resolve()} resolves outside the data root {pipeline.data_root.resolve()}: not read"
    skips = pipeline.summary()["stages"]["chunks"]["skips"]
    assert {"file": "hostname.md", "index": None, "reason": reason} in skips
    logged = [e.user_message for e in pipeline.instance.all_logs(result.run_id)
              if e.dagster_event is None and e.level == logging.WARNING]
    # said once, in the one WARNING for all skips (the per-skip line is DEBUG)
    assert [m for m in logged if "hostname.md" in m] == [
        f"chunks: 1 inputs skipped (hostname.md: {reason}); every skip is in stages.chunks.skips"]
    [event] = result.get_asset_materialization_events()
    assert event.materialization.metadata["chunks_skipped"].value == len(skips)


def test_io_manager_reports_truncated_chunks_file_as_storage_error(pipeline):
    assert pipeline.materialize(selection=dg.AssetSelection.assets("chunks")).success
    chunks_file = pipeline.file("chunks", "demo.arrow")
    chunks_file.write_bytes(chunks_file.read_bytes()[: chunks_file.stat().st_size // 2])
    result = pipeline.materialize(selection=dg.AssetSelection.assets(DENSE_A), raise_on_error=False)
    assert not result.success
    text = _failure_text(result)
    assert f"StorageError: {chunks_file} is not a valid Arrow IPC file (truncated or corrupt: " in text
    assert "rematerialize the asset that writes it" in text


# --------------------------------------------------------------------------- sensor


def test_scan_collections_names_every_folder_that_is_not_a_collection(data_root):
    names, unusable = PathsResource(data_root=str(data_root)).scan_collections()
    assert names == ["inlink", "ok"]
    assert [folder for folder, _ in unusable] == [".cache", "bad name", "outlink"]


def test_sensor_refuses_symlinked_folder_out_of_the_data_root(data_root):
    sensor = build_collection_sensor(dg.define_asset_job(EMBED_JOB_NAME, selection=dg.AssetSelection.all()))
    resources = {"paths": PathsResource(data_root=str(data_root))}
    with dg.instance_for_test() as instance:
        result = sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert [r.partition_key for r in result.run_requests] == ["inlink", "ok"]
        instance.add_dynamic_partitions(COLLECTIONS_PARTITION, ["inlink", "ok"])
        result = sensor(dg.build_sensor_context(instance=instance, resources=resources))
        message = result.skip_reason.skip_message
        for line in [*EXPECTED_SKIPPED_LINES, _outlink_line(data_root)]:
            assert line in message


def test_collection_dir_refuses_symlink_out_of_the_data_root(data_root):
    paths = PathsResource(data_root=str(data_root))
    assert paths.collection_dir("inlink") == (data_root / "ok").resolve()
    with pytest.raises(Exception, match=r"collection 'outlink': its folder is a symlink to .*outside, which "
                                         r"resolves outside the data root"):
        paths.collection_dir("outlink")


# --------------------------------------------------------------------------- collections CLI


@pytest.fixture
def cli_env(data_root, tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("RAG_CLEAN_DATA_ROOT", str(data_root))
    return data_root


def test_sync_prints_one_line_per_skipped_folder(cli_env, capsys):
    assert cli.main(["sync"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [*EXPECTED_SKIPPED_LINES, _outlink_line(cli_env),
                     "collections under the data root: ['inlink', 'ok']; newly added: ['inlink', 'ok']"]


@pytest.mark.parametrize(("name", "error"), [
    ("bad/name", "error: collection name 'bad/name' is not allowed"),
    ("outlink", "error: collection 'outlink': its folder is a symlink to "),
    ("absent", "error: collection 'absent': folder "),
])
def test_add_user_errors_are_one_line_and_exit_2(cli_env, capsys, name, error):
    assert cli.main(["add", name]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(error) and captured.err.count("\n") == 1
    assert captured.out == ""


def test_add_bad_name_from_the_shell_has_no_traceback(cli_env):
    proc = subprocess.run([sys.executable, "-m", "rag_clean_assets.collections", "add", "bad/name"],
                          cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: collection name 'bad/name' is not allowed")
