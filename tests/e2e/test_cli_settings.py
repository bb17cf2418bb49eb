"""rag-clean refuses bad settings, registries, model sources and roots before any run: one line naming the
variable (or model, or root), exit status 2, no traceback, nothing written. Issue 22 items 6-9. Cheap:
every case stops before the first step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rag_clean_assets.cli import main

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tree(tmp_path, monkeypatch):
    chunked = tmp_path / "Chunked"
    (chunked / "docs").mkdir(parents=True)
    (chunked / "docs" / "a.md").write_text("# Title\n\nsome text about backups\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # no ./.env or ./config of the repo
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EMBEDDER_CONFIG_FILE", str(tmp_path / "absent.json"))
    for var in ("RAG_CLEAN_MODEL_REGISTRY", "RAG_CLEAN_EXECUTOR", "RAG_CLEAN_GPU_POOL_LIMIT", "RAG_CLEAN_STORAGE_ROOT"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _args(tree: Path, *extra: str) -> list[str]:
    return ["--chunked-dir", str(tree / "Chunked"), "--storage-root", str(tree / "store"), *extra]


def _nothing_written(tree: Path) -> bool:
    return not (tree / "store").exists() and not (tree / "home").exists()


@pytest.mark.parametrize("name, value, line", [
    ("RAG_CLEAN_EXECUTOR", "bogus", "error: RAG_CLEAN_EXECUTOR='bogus': not one of 'in_process', 'multiprocess', 'k8s'"),
    ("RAG_CLEAN_GPU_POOL_LIMIT", "two", "error: RAG_CLEAN_GPU_POOL_LIMIT='two': not a whole number"),
    ("RAG_CLEAN_MODEL_REGISTRY", "/nonexistent/models.toml",
     "error: model registry /nonexistent/models.toml (from RAG_CLEAN_MODEL_REGISTRY) does not exist"),
])
def test_a_bad_process_setting_is_one_line_and_exit_2(tree, tiny_registry_path, name, value, line):
    """These crashed the import of the definitions (traceback, exit 1) before the CLI could say anything."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore", **{name: value})
    extra = [] if name == "RAG_CLEAN_MODEL_REGISTRY" else ["--registry", str(tiny_registry_path)]
    out = subprocess.run([sys.executable, "-m", "rag_clean_assets.cli", *_args(tree, *extra)], env=env, cwd=tree,
                         capture_output=True, text=True, timeout=180)
    assert (out.returncode, out.stderr.strip()) == (2, line)
    assert _nothing_written(tree)


def test_registry_flag_wins_over_a_broken_registry_in_the_environment(tree, tiny_registry_path, monkeypatch, capsys):
    broken = tree / "broken.toml"
    broken.write_text("[[models]\n", encoding="utf-8")
    monkeypatch.setenv("RAG_CLEAN_MODEL_REGISTRY", str(broken))
    # An unknown model stops rag-clean at the plan: the message names the registry that was used.
    assert main(_args(tree, "--registry", str(tiny_registry_path), "--ensemble-models", "nope")) == 2
    err = capsys.readouterr().err
    assert f"['nope'] are not dense models of the registry {tiny_registry_path}" in err and "broken" not in err


def test_a_missing_model_folder_stops_before_any_step(tree, tiny_registry_path, capsys):
    text = tiny_registry_path.read_text(encoding="utf-8")
    folder = next(line.split('"')[1][len("path:"):] for line in text.splitlines() if "tiny-b" in line and "path:" in line)
    registry = tree / "models.toml"
    registry.write_text(text.replace(folder, str(tree / "gone" / "tiny-b")), encoding="utf-8")
    assert main(_args(tree, "--registry", str(registry))) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model tiny-b (dense): source 'path:")
    assert "does not exist" in lines[0] and _nothing_written(tree)


def test_a_storage_root_inside_a_collection_folder_is_refused(tree, tiny_registry_path, capsys):
    inside = tree / "Chunked" / "docs" / "store"
    code = main(["--chunked-dir", str(tree / "Chunked"), "--storage-root", str(inside),
                 "--registry", str(tiny_registry_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: storage root {inside} is inside the collection folder")
    assert len(err.splitlines()) == 1 and not inside.exists()


def test_a_misspelt_dotenv_key_is_refused(tree, tiny_registry_path, capsys):
    (tree / ".env").write_text("EMBEDDER_ENABLE_RERANC=0\n", encoding="utf-8")
    assert main(_args(tree, "--registry", str(tiny_registry_path))) == 2
    assert "unknown setting EMBEDDER_ENABLE_RERANC (did you mean 'EMBEDDER_ENABLE_RERANK'?)" in capsys.readouterr().err
