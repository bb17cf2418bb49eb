"""vector_index: the collection's vectors and chunk payloads in a vector database (Qdrant Edge embedded by
default, a Qdrant server, or off), synced incrementally by content hash and model fingerprint."""


from typing import Optional

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.config.registry import Registry
from rag_clean.stages.context import EmbeddedChunks
from rag_clean.stages.index import INDEX, INDEX_TABLE_SCHEMA
from rag_clean.storage.embeddings import EmbeddingSet
from rag_clean_assets import versions
from rag_clean_assets.assets.common import run_asset, stage_asset
from rag_clean_assets.assets.dense import embedded_chunks_ins
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource

INDEX_KEY = dg.AssetKey("vector_index")


def build_index_asset(registry: Registry) -> dg.AssetsDefinition:
    @dg.asset(
        key=INDEX_KEY,
        ins=embedded_chunks_ins(registry),
        output_required=False,   # index_sink=off: skipped, not materialized empty
        **stage_asset(group="index", kinds={"qdrant"}, code_version=versions.INDEX, gpu=False,
                      columns=INDEX_TABLE_SCHEMA),
        description="Every chunk as a point of a vector database (Qdrant's model: named dense vectors fused + one "
                    "per dense model, one sparse vector per sparse model, the chunk's payload), synced by content "
                    "hash and model fingerprint: only changed chunks are written, removed ones deleted. Sink: "
                    "index_sink (qdrant-edge under the storage root, qdrant at qdrant_url, or off: skipped).",
    )
    def vector_index(context: dg.AssetExecutionContext, chunks: pa.Table, fused_embeddings: EmbeddingSet,
                     sparse_vectors: Optional[pq.ParquetFile], registry: ModelRegistryResource,
                     settings: EmbedderSettingsResource, paths: PathsResource, **dense_sets: Optional[EmbeddingSet]):
        output = run_asset(context, INDEX, EmbeddedChunks(chunks, fused_embeddings, dense_sets, sparse_vectors),
                           paths=paths, registry=registry, settings=settings)
        if not output.value.disabled:  # index_sink=off: skipped, not materialized empty (output_required=False)
            yield output

    return vector_index
