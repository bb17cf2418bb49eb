"""Incremental runs equal full runs: after editing, adding and removing a chunk, rematerializing over the
previous files gives byte-identical dense, fused and sparse files (and the bge-m3 lexical side file) to a
materialization of the same collection into an empty storage root, and the records count exactly what
was reused and what was computed (bge-m3: the ColBERT side file too)."""

from __future__ import annotations

import json

import dagster as dg
import pytest

import rag_clean.encoders.runner as runner
from rag_clean.storage.arrow_io import read_arrow_table

from pipeline_helpers import Pipeline, write_collection
from test_bge_m3_joint import write_registry as write_bge_m3_registry

ENCODE_ASSETS = ["chunks", "fused_embeddings", "sparse_vectors"]


def _edit_collection(folder) -> None:
    """One chunk edited (note-1), one added (note-2), one removed (legacy-2)."""
    (folder / "notes.jsonl").write_text(
        json.dumps({"id": "note-1", "text": "install the gpu driver first, then reboot", "author": "ops"}) + "\n"
        + json.dumps({"id": "note-2", "text": "the index server needs a restart after an upgrade"}) + "\n",
        encoding="utf-8")
    records = json.loads((folder / "old_chunks.json").read_text(encoding="utf-8"))
    (folder / "old_chunks.json").write_text(json.dumps([r for r in records if r["metadata"]["chunk_id"] != "legacy-2"]),
                                            encoding="utf-8")


def _outputs(pipeline: Pipeline) -> dict[str, bytes]:
    root = pipeline.storage_root
    files = sorted(root.glob("dense_embeddings/*/demo.arrow")) + [root / "fused_embeddings" / "demo.arrow",
                                                                  root / "sparse_vectors" / "demo.parquet"]
    files += sorted((root / "sparse_vectors" / "_joint").glob("*/demo.parquet"))
    files += sorted((root / "colbert_vectors").glob("*/demo.arrow"))
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.fixture
def one_row_batches(monkeypatch):
    """A row's float32 vector depends (in the last bit) on which rows share its batch: CPU GEMM kernels
    block by the batch's shape. One row per batch makes every row's arithmetic the same in both runs,
    so the files can be compared byte for byte (test_incremental_run_with_default_batches covers the rest)."""
    real_init = runner.Runner.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.max_batch_items = 1

    monkeypatch.setattr(runner.Runner, "__init__", init)


@pytest.mark.parametrize("registry", ["tiny", "bge-m3"])
def test_incremental_run_equals_full_run(registry, one_row_batches, tmp_path, tiny_models_dir, tiny_registry_path,
                                         clean_settings):
    registry_path = (tiny_registry_path if registry == "tiny"
                     else write_bge_m3_registry(tmp_path / "models.toml", tiny_models_dir, with_splade=True, colbert=True))
    data_root = tmp_path / "data"
    folder = write_collection(data_root)
    incremental = Pipeline(data_root, tmp_path / "incremental", registry_path, tmp_path / "locks")
    dense_keys = [a.key for a in incremental.assets if a.key.path[0] == "dense_embeddings"]
    selection = dg.AssetSelection.assets(*ENCODE_ASSETS, *dense_keys)

    assert incremental.materialize(selection=selection).success
    n_before = read_arrow_table(incremental.file("chunks", "demo.arrow")).num_rows
    _edit_collection(folder)
    assert incremental.materialize(selection=selection).success
    n = read_arrow_table(incremental.file("chunks", "demo.arrow")).num_rows
    assert n == n_before  # one removed, one added

    full = Pipeline(data_root, tmp_path / "full", registry_path, tmp_path / "locks")
    assert full.materialize(selection=selection).success

    got, want = _outputs(incremental), _outputs(full)
    assert set(got) == set(want) and len(got) >= 4
    for name in want:
        assert got[name] == want[name], f"{name}: incremental run differs from a full run"

    stages = incremental.summary()["stages"]
    for key in dense_keys:
        assert stages[key.to_user_string()]["reuse"] == {"reused": n - 2, "computed": 2}
    sparse_counts = stages["sparse_vectors"]["reuse_counts"]
    assert sparse_counts["tiny-splade"] == {"unit": "chunks", "reused": n - 2, "computed": 2}
    assert stages["fused_embeddings"]["reuse_counts"]["fused"] == {"unit": "chunks", "reused": n - 2, "computed": 2}
    if registry == "bge-m3":
        joint = stages["dense_embeddings/tiny_bge_m3"]["joint"]
        assert joint["sparse_rows"] == n and joint["sparse_rows_reused"] == n - 2
        assert joint["colbert_rows"] == n and joint["colbert_rows_reused"] == n - 2
        # The lexical model's rows came from the dense pass's side file (its 2 new rows were computed
        # there), so the sparse stage encoded none of them.
        assert stages["sparse_vectors"]["shared_pass"]["tiny-bge-m3-lexical"]["used"] is True
        assert sparse_counts["tiny-bge-m3-lexical"] == {"unit": "chunks", "reused": n, "computed": 0}

    # Nothing changed: every row is reused, and the files stay byte-identical.
    assert incremental.materialize(selection=selection).success
    assert _outputs(incremental) == want
    stages = incremental.summary()["stages"]
    for key in dense_keys:
        assert stages[key.to_user_string()]["reuse"] == {"reused": n, "computed": 0}
