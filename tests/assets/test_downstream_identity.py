"""Through the asset graph: after an edit, an addition and a removal, queries / reranked / exports of the
incremental run equal those of a run from a fresh storage root, and they say what they reused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_helpers import Pipeline, write_collection


def _edit(folder) -> None:
    guide = folder / "guide.md"
    guide.write_text(guide.read_text().replace("lower the batch size", "lower the batch size and the token budget"))
    with open(folder / "notes.jsonl", "a", encoding="utf-8") as fh:  # one chunk added
        fh.write(json.dumps({"id": "note-2", "text": "restart the query server after an upgrade"}) + "\n")
    records = json.loads((folder / "old_chunks.json").read_text())
    (folder / "old_chunks.json").write_text(json.dumps(records[:1]))  # legacy-2 removed


def _metadata(result, node):
    return result.asset_materializations_for_node(node)[0].metadata


def test_incremental_downstream_assets_equal_a_fresh_run(tmp_path, tiny_registry_path, clean_settings):
    folder = write_collection(tmp_path / "data")
    inc = Pipeline(tmp_path / "data", tmp_path / "storage", tiny_registry_path, tmp_path / "locks")
    settings = dict(enable_exports=True)
    inc.materialize(export_dir=str(tmp_path / "exp_inc"), **settings)
    _edit(folder)
    second = inc.materialize(export_dir=str(tmp_path / "exp_inc"), **settings)

    shutil.copytree(tmp_path / "data", tmp_path / "data2")
    fresh = Pipeline(tmp_path / "data2", tmp_path / "storage2", tiny_registry_path, tmp_path / "locks")
    fresh.materialize(export_dir=str(tmp_path / "exp_fresh"), **settings)

    assert inc.file("queries", "demo.parquet").read_bytes() == fresh.file("queries", "demo.parquet").read_bytes()
    a, b = (pq.read_table(p.file("reranked", "demo.parquet")) for p in (inc, fresh))
    assert "legacy-2" not in a.column("chunk_id").to_pylist()
    for name in ("query_id", "rank", "chunk_id", "retrieval_score", "scorer"):
        assert a.column(name).equals(b.column(name)), name
    np.testing.assert_allclose(a.column("rerank_score").to_numpy(zero_copy_only=False),
                               b.column("rerank_score").to_numpy(zero_copy_only=False), rtol=0, atol=1e-5)

    exp_a, exp_b = (pq.read_table(p.file("exports", "demo.parquet")) for p in (inc, fresh))
    summary_name = "demo_processing_summary.json"  # holds run ids and timings: differs by design
    rows = lambda t: sorted((r for r in t.to_pylist() if r["name"] != summary_name), key=lambda r: r["name"])  # noqa: E731
    assert [r["name"] for r in rows(exp_a)] == [r["name"] for r in rows(exp_b)]
    assert rows(exp_a) == rows(exp_b)

    reranked = json.loads(json.dumps(_metadata(second, "reranked")["reuse"].value))
    assert reranked["rerank_pairs"]["reused"] > 0 and reranked["rerank_pairs"]["computed"] > 0
    assert any(v["computed"] == 0 and v["reused"] > 0 for k, v in reranked.items() if k.startswith("query_vectors/"))
    exports = _metadata(second, "exports")["reuse"].value
    assert exports["qdrant_lines"]["reused"] > 0 and exports["qdrant_lines"]["computed"] >= 2
