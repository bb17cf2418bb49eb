"""Materialize the real asset graph with tiny random models into temporary roots (shared by asset tests)."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from rag_clean_assets.definitions import build_assets, build_resources
from rag_clean_assets.checks import build_checks
from rag_clean.config.registry import load_registry
from resources.gpu_lease import GpuLeaseResource
from resources.settings import EmbedderSettingsResource

MD_DOC = """# Install guide

## Requirements

You need a gpu driver and python to install the embedding service. The query server runs on linux.

## Configure the index

Set the chunk size and the retrieval model in the config file before you install the index.

## Troubleshooting

If the gpu runs out of memory, lower the batch size and run the query again.
"""


def write_collection(root: Path, name: str = "demo", *, queries: list[dict] | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "guide.md").write_text(MD_DOC, encoding="utf-8")
    records = [
        {"text": "the embedding model maps each chunk to a vector", "metadata": {
            "chunk_id": "legacy-1", "heading_text": "Embedding", "section_path": ["Models", "Embedding"],
            "sparse_features": {"term_weights": {"embedding": 1.5, "vector": 0.7}}}},
        {"text": "rerank the retrieval results with a cross encoder", "metadata": {
            "chunk_id": "legacy-2", "heading_text": "Rerank", "section_path": ["Models", "Rerank"]}},
    ]
    (folder / "old_chunks.json").write_text(json.dumps(records), encoding="utf-8")
    (folder / "notes.jsonl").write_text(
        json.dumps({"id": "note-1", "text": "install the gpu driver first", "author": "ops"}) + "\n", encoding="utf-8")
    if queries is not None:
        (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    return folder


class Pipeline:
    """The asset graph bound to one data root / storage root / registry, materialized in process."""

    def __init__(self, data_root: Path, storage_root: Path, registry_path: Path, lock_dir: Path):
        self.data_root, self.storage_root, self.registry_path, self.lock_dir = data_root, storage_root, registry_path, lock_dir
        self.assets = build_assets(str(registry_path))
        self.checks = build_checks(load_registry(registry_path))
        self.instance = dg.DagsterInstance.ephemeral()

    def resources(self, **settings) -> dict:
        return build_resources(data_root=str(self.data_root), storage_root=str(self.storage_root),
                               registry_path=str(self.registry_path),
                               settings=EmbedderSettingsResource(dotenv_file=str(self.data_root / "no.env"), **settings),
                               gpu_lease=GpuLeaseResource(lock_dir=str(self.lock_dir)))

    def materialize(self, collection: str = "demo", selection=None, raise_on_error: bool = True, **settings):
        self.instance.add_dynamic_partitions("collections", [collection])
        return dg.materialize([*self.assets, *self.checks], selection=selection, partition_key=collection,
                              resources=self.resources(**settings), instance=self.instance,
                              raise_on_error=raise_on_error)

    def file(self, *parts: str) -> Path:
        return self.storage_root.joinpath(*parts)

    def summary(self, collection: str = "demo") -> dict:
        return json.loads(self.file("telemetry", collection, "processing_summary.json").read_text())


BUNDLED_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "collections" / "sample"


def materialize_sample(root: Path, registry_path: Path) -> Pipeline:
    """The bundled sample collection, copied under `root`, materialized whole (chunks .. reranked, vector_index)
    with the tiny models: what the search tests query."""
    import shutil

    data_root = root / "data"
    shutil.copytree(BUNDLED_SAMPLE, data_root / "sample")
    pipeline = Pipeline(data_root, root / "storage", registry_path, root / "locks")
    result = pipeline.materialize("sample")
    # The index search reads is the one the graph's vector_index asset built.
    assert dg.AssetKey("vector_index") in {e.asset_key for e in result.get_asset_materialization_events()}
    return pipeline
