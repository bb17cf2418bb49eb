"""exports: the old embedder's export files (.npy, qdrant/sparse JSONL, metadata, stats, summary copy)."""


from typing import Iterator, Optional

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.config.registry import Registry
from rag_clean.exports.files import FILES_SCHEMA
from rag_clean.stages.context import EmbeddedChunks, StageOutput
from rag_clean.stages.exports import EXPORTS, EXPORTS_ASSET
from rag_clean.storage.embeddings import EmbeddingSet
from rag_clean_assets.assets.common import run_asset, stage_asset
from rag_clean_assets.assets.dense import embedded_chunks_ins
from rag_clean_assets import versions
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource

EXPORTS_KEY = dg.AssetKey(EXPORTS_ASSET)


def build_exports_asset(registry: Registry) -> dg.AssetsDefinition:
    @dg.asset(
        key=EXPORTS_KEY,
        ins=embedded_chunks_ins(registry),
        # After reranked, so the summary copy covers every stage of the run.
        deps=[dg.AssetKey("reranked")],
        **stage_asset(group="exports", kinds={"numpy", "json"}, code_version=versions.EXPORTS,
                      gpu=False, columns=FILES_SCHEMA),
        output_required=False,  # off by default: a disabled export yields nothing
        # Placeholders in braces: the UI renders descriptions as markdown and swallows <...> as HTML.
        description="The old embedder's export files under {export_dir}/{collection}/: fused and per-model .npy, "
                    "qdrant JSONL (named vectors per model + fused + sparse), sparse JSONL, metadata, stats, and a "
                    "copy of the processing summary. Off unless enable_exports (rag-clean --output-dir, config, "
                    "EMBEDDER_ENABLE_EXPORTS=1 or run config). Value: the files written with bytes and sha256.",
    )
    def exports(context: dg.AssetExecutionContext, chunks: pa.Table, fused_embeddings: EmbeddingSet,
                sparse_vectors: pq.ParquetFile | None, registry: ModelRegistryResource, settings: EmbedderSettingsResource,
                paths: PathsResource, **dense_sets: Optional[EmbeddingSet]) -> Iterator[dg.Output[StageOutput]]:
        output = run_asset(context, EXPORTS, EmbeddedChunks(chunks, fused_embeddings, dense_sets, sparse_vectors),
                           paths=paths, registry=registry, settings=settings)
        if not output.value.disabled:  # off: no output, no materialization (the UI shows it as not run, not green)
            yield output

    return exports
