"""chunks: a collection folder read into one table of chunks (old chunk files, JSONL, Markdown, text)."""


import dagster as dg

from rag_clean.chunking import ChunkingConfig
from rag_clean.stages.chunks import run_chunks_stage
from rag_clean.stages.common import StageOutput, StageTimer
from rag_clean_assets.assets.common import log_warnings, run_plan, staged_file, stage_asset, start_record
from rag_clean_assets import versions
from rag_clean_assets.observe import COLLECTION_FILES, record_read_version
from rag_clean_assets.versions import versioned
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource


class ChunksConfig(dg.Config):
    max_tokens: int = 256
    overlap_tokens: int = 32


def chunks(context: dg.AssetExecutionContext, config: ChunksConfig, paths: PathsResource,
           registry: ModelRegistryResource, settings: EmbedderSettingsResource) -> dg.Output[StageOutput]:
    timer = StageTimer()
    plan = run_plan(context, registry, settings)
    folder = paths.collection_dir(context.partition_key)
    # Before reading: the provenance then names the folder version read, so Dagster sees later edits.
    record_read_version(context, paths)
    # The engine's model-independent token estimate: chunk ids (and the gold ids of queries.jsonl)
    # stay the same when the registry's models change.
    spool, result, record = run_chunks_stage(
        folder, staged_file(paths, context.asset_key, context.partition_key),
        paths.layout().chunks_manifest_file(context.partition_key),
        ChunkingConfig(max_tokens=config.max_tokens, overlap_tokens=config.overlap_tokens),
        reuse=plan.reuse_unchanged)
    for skip in result.skipped:
        context.log.warning(f"skipped {skip.file}" + (f" #{skip.index}" if skip.index is not None else "") + f": {skip.reason}")
    record = start_record(record, plan)
    log_warnings(context, record)
    return versioned(context, StageOutput(spool, timer.stamp(record)))


def build_chunks_asset() -> dg.AssetsDefinition:
    """Built when the definitions are (its pod tags read the executor and pod config), not at import."""
    return dg.asset(
        **stage_asset(group="ingest", kinds={"python", "arrow"}, code_version=versions.CHUNKS,
                      gpu=False),
        deps=[COLLECTION_FILES],
        description="Chunks of one collection: old *_chunks.json files, JSONL, and Markdown/text documents chunked "
                    "heading-aware within a token budget. Stable chunk_id and a content hash per chunk. Only new or "
                    "changed files are parsed; unchanged files' rows are copied from the previous file.",
    )(chunks)
