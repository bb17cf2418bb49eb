"""The dense and sparse assets through Dagster on a real local Ray cluster: same files (within the stated
float tolerance, see tests/engine/test_ray_encode.py) as the in-process run, no local GPU lease held."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from rag_clean.storage.embeddings import read_embeddings  # noqa: E402

from pipeline_helpers import Pipeline, write_collection  # noqa: E402

ENCODE = ["chunks", "dense_embeddings/tiny_a", "sparse_vectors"]


# The session's local cluster (tests/conftest.py), no warm worker from another module.
pytestmark = pytest.mark.usefixtures("ray_workers")


def _run(tmp_path, tiny_registry_path, name: str, **settings) -> Pipeline:
    write_collection(tmp_path / name / "data")
    pipeline = Pipeline(tmp_path / name / "data", tmp_path / name / "storage", tiny_registry_path, tmp_path / "locks")
    import dagster as dg

    assert pipeline.materialize(selection=[dg.AssetKey.from_user_string(k) for k in ENCODE], **settings).success
    return pipeline


def test_assets_on_ray_match_the_in_process_run(tmp_path, tiny_registry_path, clean_settings):
    local = _run(tmp_path, tiny_registry_path, "local")
    remote = _run(tmp_path, tiny_registry_path, "remote", ray_address="auto", ray_shard_rows=2)

    a = read_embeddings(local.file("dense_embeddings", "tiny_a", "demo.arrow"))
    b = read_embeddings(remote.file("dense_embeddings", "tiny_a", "demo.arrow"))
    assert a.chunk_ids == b.chunk_ids and a.content_hashes == b.content_hashes
    assert np.abs(np.asarray(a.vectors) - np.asarray(b.vectors)).max() <= 1e-5

    def sparse(p):
        rows = pq.read_table(p.file("sparse_vectors", "demo.parquet")).to_pylist()
        return {(r["chunk_id"], r["model"]): r for r in rows}

    sa, sb = sparse(local), sparse(remote)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key]["term_ids"] == sb[key]["term_ids"]
        assert np.allclose(sa[key]["weights"], sb[key]["weights"], atol=1e-5)

    stages = remote.summary()["stages"]
    dense = stages["dense_embeddings/tiny_a"]
    assert dense["device"].startswith("ray[") and dense["lease"] is None
    assert dense["provenance"]["ray_address"] == "run config"
    assert stages["sparse_vectors"]["devices"][0].startswith("ray[")
    assert local.summary()["stages"]["dense_embeddings/tiny_a"]["lease"] is not None
