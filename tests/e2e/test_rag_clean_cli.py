"""`rag-clean` end to end, the issue's "Done when": an old-format Chunked/<collection> folder, run with the
old flags (default, --disable-rerank, --disable-sparse, env / .env / config overrides, the installed console
script), then the summaries (v4.1 keys, toggles, provenance), the exports and dense-only parity."""

from __future__ import annotations

import contextlib
import re
import filecmp
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from v41_spec import V41_NESTED
from rag_clean.exports.files import TEXT_PREVIEW_CHARS, export_files, point_id
from rag_clean.telemetry.summary import V41_KEYS, read_summary
from rag_clean_assets.cli import build_parser, main

pytestmark = pytest.mark.e2e

COLLECTION = "docs"


def _record(i: int, text: str, file: str, terms: dict | None = None) -> dict:
    """A chunk record exactly as the old chunker wrote it."""
    meta = {
        "chunk_id": f"{file}::{i:04d}", "source_file": f"manuals/{file}.md", "filename": f"{file}.md",
        "chunk_index": i, "section_path": [file.title(), f"Section {i}"], "heading_text": f"Section {i}",
        "token_count": len(text.split()), "char_count": len(text), "parent_chunk_id": None if i == 0 else f"{file}::0000",
        "content_type": "text",
    }
    if terms:
        meta["sparse_features"] = {"term_weights": terms}
    return {"text": text, "metadata": meta}


LONG = "the backup service writes each chunk of the index to disk and keeps a log of every file " * 8
FILES = {
    "faq_chunks.json": [
        _record(0, "how do i restart the backup service after an update", "faq", {"restart": 1.2, "service": 0.6}),
        _record(1, "which python version does the client need", "faq"),
    ],
    "guide_chunks.json": [
        _record(0, "install the gpu driver before the embedding server", "guide", {"gpu": 2.0, "driver": 1.1}),
        _record(1, LONG, "guide"),
        _record(2, "configure the retrieval model and the vector index", "guide", {"index": 0.9}),
        _record(3, "rerank the search results with a cross encoder", "guide"),
    ],
}
EXPECTED_IDS = [r["metadata"]["chunk_id"] for name in sorted(FILES) for r in FILES[name]]
EXPECTED_TEXTS = [r["text"] for name in sorted(FILES) for r in FILES[name]]


@dataclass
class Run:
    code: int
    out: str
    err: str
    summary: dict | None  # snapshot taken right after the run (later runs rewrite the file)


class Workspace:
    """One temp tree: Chunked/ data root, DAGSTER_HOME, storage roots, export dirs; runs rag-clean in it."""

    def __init__(self, root: Path, registry: Path):
        self.root, self.registry = root, registry
        self.chunked = root / "Chunked"
        (self.chunked / COLLECTION).mkdir(parents=True)
        for name, records in FILES.items():
            (self.chunked / COLLECTION / name).write_text(json.dumps(records, indent=1), encoding="utf-8")
        self.home = root / "dagster_home"
        self.cwd = root / "cwd"  # no config/embedder.json or .env here unless a test writes one
        self.cwd.mkdir()

    def args(self, storage: str, *extra: str) -> list[str]:
        return ["--chunked-dir", str(self.chunked), "--registry", str(self.registry),
                "--storage-root", str(self.root / storage), *extra]

    def summary(self, storage: str) -> dict | None:
        path = self.root / storage / "telemetry" / COLLECTION / "processing_summary.json"
        return read_summary(path) if path.exists() else None

    def run(self, storage: str, *extra: str, env: dict | None = None) -> Run:
        out, err = io.StringIO(), io.StringIO()
        with pytest.MonkeyPatch.context() as mp:
            for key, value in (env or {}).items():
                mp.setenv(key, value)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(self.args(storage, *extra))
        return Run(code, out.getvalue(), err.getvalue(), self.summary(storage))

    def run_console_script(self, storage: str, *extra: str, env: dict | None = None) -> Run:
        script = Path(sys.executable).parent / "rag-clean"
        proc = subprocess.run([str(script), *self.args(storage, *extra)], cwd=self.cwd, capture_output=True,
                              text=True, timeout=300, env={**os.environ, **(env or {})})
        return Run(proc.returncode, proc.stdout, proc.stderr, self.summary(storage))


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_registry_path):
    root = tmp_path_factory.mktemp("rag_clean_cli")
    workspace = Workspace(root, tiny_registry_path)
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("EMBEDDER_") or key in ("RAG_CLEAN_STORAGE_ROOT", "RAG_CLEAN_DATA_ROOT",
                                                      "RAG_CLEAN_MODEL_REGISTRY", "RAG_CLEAN_FORCE_CPU"):
                mp.delenv(key)
        mp.setenv("DAGSTER_HOME", str(workspace.home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.chdir(workspace.cwd)
        yield workspace


@pytest.fixture(scope="module")
def default_run(ws) -> Run:
    # No --collections: every folder under the data root, as the old script did.
    run = ws.run("store", "--output-dir", str(ws.root / "out"))
    assert run.code == 0, run.err[-3000:]
    return run


@pytest.fixture(scope="module")
def dense_only_run(ws, default_run) -> Run:
    run = ws.run("store_dense_only", "--collections", COLLECTION, "--disable-sparse", "--disable-rerank",
                 "--output-dir", str(ws.root / "out_dense_only"))
    assert run.code == 0, run.err[-3000:]
    return run


def _toggles(summary: dict) -> tuple:
    ft = summary["feature_toggles"]
    return ft["enable_rerank"], ft["enable_sparse"], ft["provenance"]["enable_rerank"], ft["provenance"]["enable_sparse"]


def _assert_v41_shape(summary: dict) -> None:
    assert set(V41_KEYS) <= set(summary)
    for key, nested in V41_NESTED.items():
        assert nested <= set(summary[key]), (key, nested - set(summary[key]))
    assert summary["schema_version"] == "v4.2" and summary["compatibility"]["legacy"] == ["v4.1", "v4.0"]
    assert summary["collection"] == COLLECTION and summary["chunk_count"] == len(EXPECTED_IDS)


# ---------------------------------------------------------------- default run


def test_default_run_summary(ws, default_run):
    s = default_run.summary
    _assert_v41_shape(s)
    assert _toggles(s) == (True, True, "default", "default")
    assert s["feature_toggles"]["provenance"]["enable_exports"] == "cli"
    assert "enable_sparse=true (default)" in s["feature_toggles"]["provenance_lines"]
    assert s["dense_run"]["models_executed"] == ["tiny-a", "tiny-b"]
    assert s["dense_run"]["total_embeddings_generated"] == 2 * len(EXPECTED_IDS)
    assert s["dense_run"]["latency_seconds"]["p50"] > 0  # measured batch timings, not a placeholder
    assert s["sparse_run"]["enabled"] and s["sparse_run"]["model_names"] == ["tiny-splade"]
    assert s["sparse_run"]["vectors"]["total"] == len(EXPECTED_IDS) and not s["sparse_run"]["fallback_used"]
    assert s["rerank_run"]["enabled"] and s["rerank_run"]["executed"] and s["rerank_run"]["status"] == "ok"
    assert s["rerank_run"]["fallback_count"] == 0
    spans = {span["name"] for span in s["telemetry"]["spans"]}
    assert {"rag.dense", "rag.sparse", "rag.rerank", "rag.export"} <= spans
    # What the user sees on the console.
    assert f"== {COLLECTION}: {len(EXPECTED_IDS)} chunks" in default_run.out
    assert "rerank: ok (enable_rerank=true from default" in default_run.out
    assert f"exports: {export_files(ws.root / 'out', COLLECTION).folder}" in default_run.out
    # a model load is a phase of its own; third-party bars stay out of the output
    assert f"{COLLECTION} dense_embeddings/tiny_a: loading model tiny-a" in default_run.out.splitlines()
    assert "Loading weights" not in default_run.out + default_run.err
    # settings: only what was chosen (exports by the CLI flag), the defaults as one count
    assert not [line for line in default_run.out.splitlines() if line.endswith("(default)")]
    assert "   enable_exports=true (cli)" in default_run.out.splitlines()
    assert re.search(r"\(\d+ other settings at their defaults: --log-level DEBUG lists them", default_run.out)


def test_default_run_is_recorded_in_the_dagster_instance(ws, default_run):
    import dagster as dg

    with dg.DagsterInstance.get() as instance:  # DAGSTER_HOME of the workspace, as the UI would open it
        assert COLLECTION in instance.get_dynamic_partitions("collections")
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"rag_clean/launched_by": "rag-clean"}))
        assert runs and all(r.job_name == "embed_collection" for r in runs)
        assert any(r.tags.get("dagster/partition") == COLLECTION and r.status == dg.DagsterRunStatus.SUCCESS
                   for r in runs)


def test_default_run_exports(ws, default_run):
    files = export_files(ws.root / "out", COLLECTION)
    n = len(EXPECTED_IDS)
    fused = np.load(files.fused)
    assert fused.shape == (n, 32 + 48) and fused.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fused, axis=1), 1.0, atol=1e-5)
    assert np.load(files.model("tiny-a")).shape == (n, 32)
    assert np.load(files.model("tiny-b")).shape == (n, 48)

    points = [json.loads(line) for line in files.qdrant.read_text().splitlines()]
    assert [p["payload"]["chunk_id"] for p in points] == EXPECTED_IDS
    assert [p["id"] for p in points] == [point_id(COLLECTION, c) for c in EXPECTED_IDS]
    assert [p["payload"]["text_preview"] for p in points] == [t[:TEXT_PREVIEW_CHARS] for t in EXPECTED_TEXTS]
    assert len(points[3]["payload"]["text_preview"]) == TEXT_PREVIEW_CHARS  # the LONG chunk is cut
    first = points[0]["payload"]["metadata"]
    assert first["sparse_features"]["term_weights"] == {"restart": 1.2, "service": 0.6}
    assert first["section_path"] == ["Faq", "Section 0"] and first["parent_chunk_id"] is None
    for i, p in enumerate(points):
        assert set(p["vectors"]) == {"tiny-a", "tiny-b", "fused", "sparse"}
        np.testing.assert_array_equal(np.asarray(p["vectors"]["fused"], np.float32), fused[i])
        assert len(p["vectors"]["sparse"]["indices"]) == len(p["vectors"]["sparse"]["values"]) > 0

    sparse = [json.loads(line) for line in files.sparse.read_text().splitlines()]
    assert [r["chunk_id"] for r in sparse] == EXPECTED_IDS and {r["model"] for r in sparse} == {"tiny-splade"}
    metadata = json.loads(files.metadata.read_text())
    assert [c["chunk_id"] for c in metadata["chunks"]] == EXPECTED_IDS
    assert metadata["fused"]["dim"] == 80 and metadata["fused"]["models"] == ["tiny-a", "tiny-b"]
    stats = json.loads(files.stats.read_text())
    assert stats["chunk_count"] == n and stats["dense"]["tiny-b"]["dim"] == 48
    copy = read_summary(files.summary)
    assert copy["collection"] == COLLECTION and set(V41_KEYS) <= set(copy)


# ---------------------------------------------------------------- variants


def test_dense_only_parity(ws, default_run, dense_only_run):
    """With sparse and rerank off (fresh storage, nothing reused) dense and fused files are byte-identical."""
    s = dense_only_run.summary
    _assert_v41_shape(s)
    assert _toggles(s) == (False, False, "cli", "cli")
    assert (s["sparse_run"]["enabled"], s["sparse_run"]["status"]) == (False, "disabled")
    assert (s["rerank_run"]["enabled"], s["rerank_run"]["executed"], s["rerank_run"]["status"]) == (False, False, "disabled")
    assert s["dense_run"]["chunks_reused"] == 0
    with_all = export_files(ws.root / "out", COLLECTION)
    dense_only = export_files(ws.root / "out_dense_only", COLLECTION)
    for a, b in ((with_all.fused, dense_only.fused), (with_all.model("tiny-a"), dense_only.model("tiny-a")),
                 (with_all.model("tiny-b"), dense_only.model("tiny-b"))):
        assert filecmp.cmp(a, b, shallow=False), b.name
    for parts in (("fused_embeddings",), ("dense_embeddings", "tiny_a"), ("dense_embeddings", "tiny_b")):
        stored = [ws.root / store / Path(*parts) / f"{COLLECTION}.arrow" for store in ("store", "store_dense_only")]
        assert filecmp.cmp(*stored, shallow=False), parts
    assert not dense_only.sparse.exists()
    assert set(json.loads(dense_only.qdrant.read_text().splitlines()[0])["vectors"]) == {"tiny-a", "tiny-b", "fused"}


def test_disable_rerank_flag(ws, default_run):
    run = ws.run("store", "--collections", COLLECTION, "--disable-rerank")
    assert run.code == 0, run.err[-3000:]
    assert _toggles(run.summary) == (False, True, "cli", "default")
    assert run.summary["rerank_run"]["status"] == "disabled" and run.summary["sparse_run"]["executed"]
    assert run.summary["dense_run"]["chunks_reused"] == 2 * len(EXPECTED_IDS)  # same storage: vectors reused
    # No --output-dir this time: exports did not run (no materialization), so its record is the earlier run's.
    assert "exports" in run.summary["runs"]["stages_from_other_runs"]


def test_env_override(ws, default_run):
    run = ws.run("store", "--collections", COLLECTION, env={"EMBEDDER_ENABLE_SPARSE": "0"})
    assert run.code == 0, run.err[-3000:]
    assert _toggles(run.summary) == (True, False, "default", "override via env")
    assert "enable_sparse=false (override via env)" in run.summary["feature_toggles"]["provenance_lines"]
    assert run.summary["sparse_run"]["status"] == "disabled" and run.summary["rerank_run"]["executed"]
    assert "sparse: disabled (enable_sparse=false from override via env" in run.out
    assert "   enable_sparse=false (override via env)" in run.out.splitlines()


def test_config_file_and_dotenv(ws, default_run):
    config = ws.root / "embedder.json"
    config.write_text(json.dumps({"enable_rerank": False, "enable_sparse": False, "sparse_models": ["tiny-splade"]}))
    dotenv = ws.root / "settings.env"
    dotenv.write_text("EMBEDDER_ENABLE_SPARSE=1\n")  # .env beats the config file
    run = ws.run("store", "--collections", COLLECTION, "--config", str(config), "--env-file", str(dotenv))
    assert run.code == 0, run.err[-3000:]
    assert _toggles(run.summary) == (False, True, "config file", ".env")
    assert run.summary["feature_toggles"]["sparse_models"] == ["tiny-splade"]
    assert run.summary["feature_toggles"]["provenance"]["sparse_models"] == "config file"
    assert run.summary["sparse_run"]["executed"] and run.summary["rerank_run"]["status"] == "disabled"


def test_default_config_file_location_and_cli_beats_everything(ws, default_run):
    """Through the installed console script, from a folder holding config/embedder.json and .env."""
    (ws.cwd / "config").mkdir(exist_ok=True)
    (ws.cwd / "config" / "embedder.json").write_text(json.dumps({"enable_sparse": False, "enable_rerank": False}))
    (ws.cwd / ".env").write_text("EMBEDDER_ENABLE_RERANK=0\n")
    try:
        run = ws.run_console_script("store", "--collections", COLLECTION, "--enable-rerank",
                                    env={"EMBEDDER_ENABLE_RERANK": "0"})
    finally:
        (ws.cwd / "config" / "embedder.json").unlink()
        (ws.cwd / ".env").unlink()
    assert run.code == 0, run.err[-3000:]
    assert _toggles(run.summary) == (True, False, "cli", "config file")
    assert run.summary["rerank_run"]["executed"]
    assert f"== {COLLECTION}: {len(EXPECTED_IDS)} chunks" in run.out


# ---------------------------------------------------------------- errors and help


def test_missing_collection_folder_exits_2(ws, capsys):
    code = main(ws.args("store", "--collections", "nope"))
    assert code == 2
    assert f"collection 'nope': folder {ws.chunked / 'nope'} does not exist" in capsys.readouterr().err


def test_unknown_ensemble_model_exits_2(ws, capsys):
    code = main(ws.args("store", "--ensemble-models", "bge-m3,tiny-a"))
    assert code == 2
    err = capsys.readouterr().err
    assert "ensemble_models (cli): ['bge-m3'] are not dense models" in err and "tiny-a" in err


def test_malformed_record_fails_the_run_naming_file_and_index(ws, capsys):
    bad = ws.root / "BadChunked" / "broken"
    bad.mkdir(parents=True)
    records = [_record(0, "fine text", "bad"), {"text": "no id here", "metadata": {"heading_text": "x"}}]
    (bad / "bad_chunks.json").write_text(json.dumps(records))
    args = ["--chunked-dir", str(bad.parent), "--registry", str(ws.registry), "--storage-root",
            str(ws.root / "store_bad"), "--collections", "broken"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "error: collection 'broken'" in err
    assert "bad_chunks.json record index 1: metadata.chunk_id is missing" in err


def test_collection_given_as_a_chunked_folder_path(ws):
    parser_args = build_parser().parse_args(["--collections", str(ws.chunked / COLLECTION)])
    from rag_clean_assets.cli import _select_collections

    root, names = _select_collections(parser_args.collections, None)
    assert (root, names) == (ws.chunked.resolve(), [COLLECTION])


def test_help_documents_every_flag():
    text = build_parser().format_help()
    for flag in ("--chunked-dir", "--output-dir", "--collections", "--ensemble-models", "--exclusive-ensemble",
                 "--no-exclusive-ensemble", "--enable-rerank", "--disable-rerank", "--enable-sparse",
                 "--disable-sparse", "--sparse-models", "--config", "--env-file", "--registry", "--storage-root"):
        assert flag in text, flag
    assert "precedence" in text


@pytest.mark.parametrize("name, content, expected", [
    ("latin1.md", "# Caf\xe9\n\nna\xefve text\n".encode("latin-1"), "latin1.md"),
    ("cut_chunks.json", b'[{"text": "fine", "metadata": {"chunk_id": "a"}}, {"text": "cut', "cut_chunks.json"),
])
def test_failed_collection_error_line_names_the_file_and_keeps_the_cause(ws, capsys, name, content, expected):
    """Issue 22.1: the per-collection error line keeps the engine's message naming the file, not only the
    innermost cause (a bare UnicodeDecodeError / JSONDecodeError)."""
    bad = ws.root / f"Bad_{name}" / "broken"
    bad.mkdir(parents=True)
    (bad / name).write_bytes(content)
    args = ["--chunked-dir", str(bad.parent), "--registry", str(ws.registry), "--storage-root",
            str(ws.root / f"store_{name}"), "--collections", "broken", "--disable-sparse", "--disable-rerank"]
    assert main(args) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("   chunks:")]
    assert len(lines) == 1 and expected in lines[0], lines
    assert "Error" in lines[0]  # the cause (e.g. UnicodeDecodeError / JSONDecodeError) is still there
