"""chunks: a collection folder read into one table of chunks (old chunk files, JSONL, Markdown, text)."""


import dagster as dg

from rag_clean.chunking import CHUNK_SCHEMA, ChunkingConfig
from rag_clean.config.registry import Registry
from rag_clean.stages.chunks import CHUNKS
from rag_clean.stages.context import StageOutput
from rag_clean_assets.assets.common import run_asset, stage_asset
from rag_clean_assets import versions
from rag_clean_assets.observe import COLLECTION_FILES, record_read_version
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource


class ChunksConfig(dg.Config):
    max_tokens: int = 256
    overlap_tokens: int = 32


def chunks(context: dg.AssetExecutionContext, config: ChunksConfig, paths: PathsResource,
           registry: ModelRegistryResource, settings: EmbedderSettingsResource) -> dg.Output[StageOutput]:
    # Before reading: the provenance then names the folder version read, so Dagster sees later edits; the
    # file digests behind that version are handed on, so the stage does not hash every file again.
    # Documents are packed by the real tokenizer of the registry model with the smallest max length
    # (rag_clean.encoders.chunk_tokens), chosen by the stage from the run plan.
    return run_asset(context, CHUNKS, ChunkingConfig(max_tokens=config.max_tokens, overlap_tokens=config.overlap_tokens),
                     record_read_version(context, paths), paths=paths, registry=registry, settings=settings)


def build_chunks_asset(registry: Registry) -> dg.AssetsDefinition:
    """Built when the definitions are (its pod tags read the executor and pod config), not at import. The
    code version covers the registry's dense / sparse entries: their strictest tokenizer packs documents."""
    return dg.asset(
        **stage_asset(group="ingest", kinds={"python", "arrow"}, code_version=versions.chunks_code_version(registry),
                      gpu=False, columns=CHUNK_SCHEMA),
        deps=[COLLECTION_FILES],
        description="Chunks of one collection: old *_chunks.json files, JSONL, and Markdown/text documents chunked "
                    "heading-aware within a token budget counted by the tokenizer of the registry model with the "
                    "smallest max length (special tokens included). Stable chunk_id and a content hash per chunk. "
                    "Only new or changed files are parsed; unchanged files' rows are copied from the previous file.",
    )(chunks)
