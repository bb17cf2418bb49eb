"""Asset tests: materialize the real graph with tiny random models into a temporary storage root."""

from __future__ import annotations


import pytest

from pipeline_helpers import Pipeline, write_collection


@pytest.fixture
def pipeline(tmp_path, tiny_registry_path, monkeypatch) -> Pipeline:
    for var in ("EMBEDDER_ENABLE_SPARSE", "EMBEDDER_ENABLE_RERANK", "EMBEDDER_SPARSE_MODELS", "RAG_CLEAN_FORCE_CPU"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EMBEDDER_CONFIG_FILE", str(tmp_path / "absent-config.json"))
    data_root = tmp_path / "data"
    write_collection(data_root)
    return Pipeline(data_root, tmp_path / "storage", tiny_registry_path, tmp_path / "locks")
