"""exports: the old embedder's export files (.npy, qdrant/sparse JSONL, metadata, stats, summary copy)."""


import json
from typing import Optional

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.exports.write import write_exports
from rag_clean.telemetry.records import ExportsRecord
from rag_clean.config.registry import Registry
from rag_clean.stages.common import StageOutput, StageTimer
from rag_clean.storage.embeddings import EmbeddingSet
from rag_clean.telemetry.summary import build_summary, read_summary, utc_now
from rag_clean_assets.assets.common import run_plan, stage_asset, start_record
from rag_clean_assets.assets.dense import dense_asset_key
from rag_clean_assets import versions
from rag_clean_assets.versions import versioned
from resources.io_manager import LAZY_INPUT
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource

EXPORTS_KEY = dg.AssetKey("exports")


def build_exports_asset(registry: Registry) -> dg.AssetsDefinition:
    dense_ins = {spec.asset_name: dg.AssetIn(key=dense_asset_key(spec)) for spec in registry.dense}

    @dg.asset(
        key=EXPORTS_KEY,
        ins={"chunks": dg.AssetIn(key="chunks"), "fused_embeddings": dg.AssetIn(key="fused_embeddings"),
             "sparse_vectors": dg.AssetIn(key="sparse_vectors", metadata={LAZY_INPUT: True}), **dense_ins},
        # After reranked, so the summary copy covers every stage of the run.
        deps=[dg.AssetKey("reranked")],
        **stage_asset(group="exports", kinds={"numpy", "json"}, code_version=versions.EXPORTS,
                      gpu=False),
        # Placeholders in braces: the UI renders descriptions as markdown and swallows <...> as HTML.
        description="The old embedder's export files under {export_dir}/{collection}/: fused and per-model .npy, "
                    "qdrant JSONL (named vectors per model + fused + sparse), sparse JSONL, metadata, stats, and a "
                    "copy of the processing summary. Off unless enable_exports (rag-clean --output-dir, config, "
                    "EMBEDDER_ENABLE_EXPORTS=1 or run config). Value: the files written with bytes and sha256.",
    )
    def exports(context: dg.AssetExecutionContext, chunks: pa.Table, fused_embeddings: EmbeddingSet,
                sparse_vectors: pq.ParquetFile | None, registry: ModelRegistryResource, settings: EmbedderSettingsResource,
                paths: PathsResource, **dense_sets: Optional[EmbeddingSet]) -> dg.Output[StageOutput]:
        timer = StageTimer()
        plan = run_plan(context, registry, settings)
        collection = context.partition_key
        reason = plan.exports_disabled_reason()
        if reason is not None:
            context.log.info(reason)
            record = ExportsRecord(status="disabled", reason=reason)
            return versioned(context, StageOutput(None, timer.stamp(start_record(record, plan))))
        # A disabled sparse stage leaves its previous file in place: never export that stale file.
        if plan.sparse_enabled and sparse_vectors is None:
            raise ValueError("sparse is enabled but sparse_vectors has no stored file for this collection: "
                             "materialize it first")
        meta = fused_embeddings.metadata
        fusion = {"method": meta.get("method"), "models": json.loads(meta.get("models", "[]")),
                  "weights": json.loads(meta.get("weights", "[]"))}
        layout = paths.layout()
        summary_path = layout.summary_file(collection)
        base = start_record(ExportsRecord(device="cpu"), plan)

        def summary_with_this_stage(partial: dict) -> dict:
            """The summary copy, with this export's own (not yet stored) record in it."""
            stages = dict(read_summary(summary_path).get("stages", {})) if summary_path.exists() else {}
            stages[EXPORTS_KEY.to_user_string()] = timer.stamp(base).to_summary() | partial | {
                "asset_key": EXPORTS_KEY.to_user_string(), "run_id": context.run_id, "partition": collection,
                "materialized_at": utc_now()}
            return build_summary(collection, stages, plan.settings.as_dict(), dict(plan.settings.provenance))

        table, record = write_exports(
            layout.export_root(plan.export_dir), collection, chunks, {s.name: dense_sets[s.asset_name] for s in plan.dense},
            fused_embeddings, fusion=fusion, sparse=sparse_vectors if plan.sparse else None,
            sparse_models=[s.name for s in plan.sparse], summary=summary_with_this_stage,
            line_index=lambda kind: layout.export_line_index(collection, kind))
        context.log.info(f"exported {len(record.files)} files to {record.export_dir}")
        record.device = "cpu"
        return versioned(context, StageOutput(table, timer.stamp(start_record(record, plan))))

    return exports
