"""The terminal output a person reads: short INFO lines with the collection, Dagster's events only at DEBUG,
and no Preview / Beta / Supersession warnings or third-party progress bars when the code location loads."""


import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg

from rag_clean_assets.console_log import short_console_logger_def

PARTITIONS = dg.StaticPartitionsDefinition(["alpha"])
ROOT = Path(__file__).resolve().parents[2]


@dg.asset(partitions_def=PARTITIONS)
def talker(context: dg.AssetExecutionContext) -> None:
    context.log.info("encoded 3 chunks")
    context.log.warning("one chunk was truncated")
    context.log.debug("detail nobody asked for")


def _run(capsys, level: str | None) -> list[str]:
    job = dg.define_asset_job("talk", selection=[talker], partitions_def=PARTITIONS)
    defs = dg.Definitions(assets=[talker], jobs=[job], loggers={"console": short_console_logger_def()})
    config = {"loggers": {"console": {"config": {"log_level": level}} if level else {}}}
    capsys.readouterr()
    result = defs.resolve_job_def("talk").execute_in_process(partition_key="alpha", run_config=config)
    assert result.success
    return capsys.readouterr().err.splitlines()


def test_info_by_default_short_lines_with_the_collection(capsys, monkeypatch):
    monkeypatch.delenv("RAG_CLEAN_LOG_LEVEL", raising=False)
    lines = _run(capsys, None)
    ours = [line for line in lines if "talker:" in line]
    assert [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in ours] == [
        "[alpha] talker: encoded 3 chunks", "[alpha] talker: WARNING: one chunk was truncated"]
    assert not [line for line in lines if "STEP_START" in line or "Started execution" in line]
    assert all(len(line) < 120 for line in lines), lines


def test_debug_brings_dagster_events_back(capsys):
    lines = _run(capsys, "DEBUG")
    assert any('Started execution of step "talker"' in line for line in lines)
    assert any(line.endswith("talker: DEBUG: detail nobody asked for") for line in lines)


def test_loading_the_code_location_prints_no_warnings():
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # Python's default warning filters, as a user has them
    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "PYTHONWARNINGS"):
        env.pop(var, None)
    # (transformers' "Loading weights" bars are switched off where models load: tests/assets/test_run_progress.py)
    code = "import rag_clean_assets.definitions"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Warning" not in out.stderr, out.stderr
