"""What the summary and the CLI say about quality: the weights used and why, labelled metrics, skips, progress."""

from __future__ import annotations

import pyarrow as pa

import rag_clean.telemetry.progress as progress

from rag_clean.chunking import ChunkingConfig
from rag_clean.config.plan import RetrievalConfig
from rag_clean.config.registry import load_registry
from rag_clean.stages.chunks import chunks_stage
from rag_clean.stages.context import StageIO
from rag_clean.storage.embeddings import read_embeddings
from stage_helpers import dense as run_dense, fuse, retrieve, sparse as run_sparse, stage_ctx
from rag_clean.telemetry.quality_text import quality_lines
from rag_clean.telemetry.summary import build_summary


def _chunks() -> pa.Table:
    words = ["install", "rerank", "query", "vector", "chunk", "model", "config", "server"]
    texts = [f"## Topic {i}  the gpu driver and the index number {i} need {words[i % 8]}" for i in range(40)]
    return pa.table({"chunk_id": [f"c{i}" for i in range(40)], "content_hash": [f"h{i}" for i in range(40)],
                     "text": texts, "heading": [f"Topic {i}" for i in range(40)],
                     "source_file": ["a_chunks.json"] * 40, "metadata_json": ["{}"] * 40})


def _stage(tiny_registry_path, tmp_path, progress=None):
    registry = load_registry(tiny_registry_path)
    chunks = _chunks()
    spec, sparse_spec = registry.get("tiny-a"), registry.get("tiny-splade")
    writer, _ = run_dense(spec, chunks, tmp_path / "a.arrow")
    writer, _ = fuse({"tiny-a": read_embeddings(writer.publish())}, {"tiny-a": 1.0}, "concat",
                     tmp_path / "f.arrow", chunks)
    sparse, _ = run_sparse([sparse_spec], chunks, root=tmp_path / "s")
    return retrieve(chunks, read_embeddings(writer.publish()), [spec], sparse, [sparse_spec], None,
                    RetrievalConfig(enable_rerank=False, tune_min_queries=10), root=tmp_path / "r", progress=progress)


def test_summary_says_which_weights_why_and_on_which_queries(tiny_registry_path, tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "MIN_STEP_GAP_S", 0.0)  # the tiny encodes take well under a second
    lines_seen: list[str] = []
    _, record = _stage(tiny_registry_path, tmp_path, progress=lines_seen.append)
    # The reranked step reports progress while it encodes queries and masked gold chunks.
    assert any(line.startswith("tiny-a queries: 40/40 queries") for line in lines_seen), lines_seen
    assert any(line.startswith("tiny-a masked gold: 40/40 chunks") for line in lines_seen), lines_seen
    assert any(line.startswith("tiny-splade queries: 40/40") for line in lines_seen), lines_seen

    summary = build_summary("demo", {"reranked": record.to_summary()}, {}, {})
    lines = quality_lines(summary)
    text = "\n".join(lines)
    hybrid = record.hybrid
    used = ", ".join(f"{k} {v:.2f}" for k, v in hybrid["weights"].items())
    assert f"hybrid weights: {used} (" in text
    assert ("default kept" if not hybrid["tuned"] else "tuned") in text
    assert "   why: hybrid weights: " in text and "held-out gain vs the default" in text and "interval [" in text
    # Every candidate system on all queries and on the held-out split, labelled.
    for label in ("candidates on all queries (40)", f"candidates on held-out ({hybrid['split']['heldout_scored']} queries)"):
        line = next(l for l in lines if l.startswith(label))
        assert all(name in line for name in ("dense", "sparse:tiny-splade", "rrf", "weighted"))
    assert "rows on all queries (40), then 'held-out' on held-out (" in text
    table = lines[next(i for i, l in enumerate(lines) if l.startswith("phase "))]
    assert table.split() == ["phase", "recall@1", "recall@5", "recall@10", "recall@20", "MRR", "MRR@10", "nDCG@10"]
    rows = lines[lines.index(table) + 1:]
    assert [r.split()[0] for r in rows] == ["before", "held-out"] and rows[1].startswith("held-out before ")
    assert not any(line.rstrip().endswith(":") for line in lines)  # no empty `heldout:` line


def test_the_default_weight_is_not_echoed_as_used_when_tuning_replaced_it():
    hybrid = {"systems": ["dense", "sparse:s"], "weights": {"dense": 0.7, "sparse:s": 0.3}, "tuned": True,
              "reason": "hybrid weights: tuned to dense 0.70, sparse:s 0.30; 5-fold CV ... is above 0",
              "default_weights": {"dense": 0.3, "sparse:s": 0.7},
              "split": {"tune": 100, "heldout": 90, "tune_scored": 100, "heldout_scored": 90},
              "heldout_gain": {"metric": "mrr@10", "queries": 90, "gain": 0.05, "interval": [0.02, 0.08], "level": 0.95},
              "heldout": {"dense": {"mrr@10": 0.5}}, "all_queries": {"dense": {"mrr@10": 0.52}}, "report_split": "heldout"}
    summary = {"rerank_run": {"queries": 190, "metrics": {"before_rerank": {"mrr@10": 0.6}}, "hybrid": hybrid,
                              "gold": {"scored_queries": 190, "dropped_queries": 0}}}
    text = "\n".join(quality_lines(summary))
    assert "hybrid weights: dense 0.70, sparse:s 0.30 (tuned; split 100 tune / 90 held-out queries)" in text
    assert "hybrid_dense_weight=0.3 (the default) was not used" in text
    assert "+0.050 MRR@10, 95% interval [+0.020, +0.080] on 90 held-out queries" in text


def test_input_skips_reach_the_summary_warnings(tmp_path):
    folder = tmp_path / "data" / "c"
    folder.mkdir(parents=True)
    (folder / "a.md").write_text("# A\n\nsome text to embed here\n", encoding="utf-8")
    (folder / "empty.md").write_text("", encoding="utf-8")
    (folder / "image.png").write_bytes(b"\x89PNG")
    ctx = stage_ctx(tmp_path / "storage", collection="c")
    ctx.collection_dir = lambda: folder
    spool, record = chunks_stage(ctx, StageIO(tmp_path / "chunks.arrow"), ChunkingConfig(), packing=None)
    spool.abort()
    summary = build_summary("c", {"chunks": record.to_summary()}, {}, {})
    warning = next(w for w in summary["warnings"] if "inputs skipped" in w)
    assert warning.startswith("chunks: 2 inputs skipped") and "empty.md: empty document" in warning
    assert "image.png: unsupported file type" in warning
