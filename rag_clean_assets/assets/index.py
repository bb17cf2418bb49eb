"""vector_index: the collection's vectors and chunk payloads in a vector database (Qdrant Edge embedded by
default, a Qdrant server, or off), synced incrementally by content hash and model fingerprint."""


from typing import Optional

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.config.registry import Registry
from rag_clean.index import open_collection_index
from rag_clean.index.sync import SyncSources
from rag_clean.stages.common import StageOutput, StageTimer
from rag_clean.stages.index import run_index_stage
from rag_clean.storage.embeddings import EmbeddingSet
from rag_clean.storage.errors import StorageError
from rag_clean_assets import versions
from rag_clean_assets.assets.common import run_plan, stage_asset, start_record
from rag_clean_assets.assets.dense import dense_asset_key
from rag_clean_assets.versions import versioned
from resources.io_manager import LAZY_INPUT
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource

INDEX_KEY = dg.AssetKey("vector_index")


def build_index_asset(registry: Registry) -> dg.AssetsDefinition:
    dense_ins = {spec.asset_name: dg.AssetIn(key=dense_asset_key(spec)) for spec in registry.dense}

    @dg.asset(
        key=INDEX_KEY,
        ins={"chunks": dg.AssetIn(key="chunks"), "fused_embeddings": dg.AssetIn(key="fused_embeddings"),
             "sparse_vectors": dg.AssetIn(key="sparse_vectors", metadata={LAZY_INPUT: True}), **dense_ins},
        output_required=False,   # index_sink=off: skipped, not materialized empty
        **stage_asset(group="index", kinds={"qdrant"}, code_version=versions.INDEX, gpu=False),
        description="Every chunk as a point of a vector database (Qdrant's model: named dense vectors fused + one "
                    "per dense model, one sparse vector per sparse model, the chunk's payload), synced by content "
                    "hash and model fingerprint: only changed chunks are written, removed ones deleted. Sink: "
                    "index_sink (qdrant-edge under the storage root, qdrant at qdrant_url, or off: skipped).",
    )
    def vector_index(context: dg.AssetExecutionContext, chunks: pa.Table, fused_embeddings: EmbeddingSet,
                     sparse_vectors: Optional[pq.ParquetFile], registry: ModelRegistryResource,
                     settings: EmbedderSettingsResource, paths: PathsResource, **dense_sets: Optional[EmbeddingSet]):
        timer = StageTimer()
        plan = run_plan(context, registry, settings)
        reason = plan.index_disabled_reason()
        if reason is not None:
            context.log.info(f"{reason}: vector_index skipped")
            return
        missing = [s.name for s in plan.dense if dense_sets.get(s.asset_name) is None]
        if missing or (plan.sparse and sparse_vectors is None):
            raise StorageError(f"vector_index for {context.partition_key!r}: no stored file for "
                               f"{missing or 'sparse_vectors'}: materialize it first")
        sources = SyncSources(chunks, fused_embeddings, {s.name: dense_sets[s.asset_name] for s in plan.dense},
                              sparse_vectors if plan.sparse else None, [s.name for s in plan.sparse])
        index = open_collection_index(plan.settings, paths.layout(), context.partition_key)
        try:
            table, record = run_index_stage(index, sources)
        finally:
            index.close()
        context.log.info(f"vector_index ({record.sink}, {record.location}): {record.upserted} upserted, "
                         f"{record.deleted} deleted, {record.unchanged} unchanged, rewritten {record.rewritten}; "
                         f"{record.index_rows} points")
        yield versioned(context, StageOutput(table, timer.stamp(start_record(record, plan))))

    return vector_index
