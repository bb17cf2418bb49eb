"""exports: the old embedder's export files (.npy, qdrant/sparse JSONL, metadata, stats, summary copy)."""


import json
from pathlib import Path

from typing import Optional

import dagster as dg
import pyarrow as pa

from rag_clean.exports import write_exports
from rag_clean.registry import Registry
from rag_clean.stages.common import StageOutput, StageTimer
from rag_clean.storage import EmbeddingSet
from rag_clean.telemetry import TelemetryStore, build_summary, read_summary, utc_now
from rag_clean_assets.assets.common import IO_MANAGER_KEY, base_record
from rag_clean_assets.assets.dense import dense_asset_key
from rag_clean_assets.assets.fused import ensemble_specs
from rag_clean_assets.assets.sparse import selected_sparse_specs
from rag_clean_assets.partitions import collections_partitions
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource

EXPORTS_KEY = dg.AssetKey("exports")


def export_root(paths: PathsResource, export_dir: str) -> Path:
    """export_dir setting, else <storage root>/exports."""
    return Path(export_dir).expanduser().resolve() if export_dir else paths.storage_dir() / "exports"


def build_exports_asset(registry: Registry) -> dg.AssetsDefinition:
    dense_ins = {spec.asset_name: dg.AssetIn(key=dense_asset_key(spec)) for spec in registry.dense}

    @dg.asset(
        key=EXPORTS_KEY,
        ins={"chunks": dg.AssetIn(key="chunks"), "fused_embeddings": dg.AssetIn(key="fused_embeddings"),
             "sparse_vectors": dg.AssetIn(key="sparse_vectors"), **dense_ins},
        # After reranked, so the summary copy covers every stage of the run.
        deps=[dg.AssetKey("reranked")],
        partitions_def=collections_partitions,
        io_manager_key=IO_MANAGER_KEY,
        group_name="exports",
        kinds={"numpy", "json"},
        description="The old embedder's export files under <export_dir>/<collection>/: fused and per-model .npy, "
                    "qdrant JSONL (named vectors per model + fused + sparse), sparse JSONL, metadata, stats, and a "
                    "copy of the processing summary. Off unless enable_exports (rag-clean --output-dir, config, "
                    "EMBEDDER_ENABLE_EXPORTS=1 or run config). Value: the files written with bytes and sha256.",
    )
    def exports(context: dg.AssetExecutionContext, chunks: pa.Table, fused_embeddings: EmbeddingSet,
                sparse_vectors: pa.Table | None, registry: ModelRegistryResource, settings: EmbedderSettingsResource,
                paths: PathsResource, **dense_sets: Optional[EmbeddingSet]) -> StageOutput:
        timer = StageTimer()
        resolved = settings.resolve()
        record = base_record(resolved)
        collection = context.partition_key
        if not resolved.enable_exports:
            reason = f"exports disabled: enable_exports=false ({resolved.provenance.get('enable_exports')})"
            context.log.info(reason)
            return StageOutput(None, timer.stamp(record | {"stage": "exports", "status": "disabled", "reason": reason,
                                                           "rows": 0}), {"executed": False})
        reg = registry.load()
        specs = ensemble_specs(reg, resolved.ensemble_models)
        # A disabled sparse stage leaves its previous file in place: never export that stale file.
        sparse_specs = selected_sparse_specs(reg, resolved.sparse_models) if resolved.enable_sparse else []
        if resolved.enable_sparse and sparse_vectors is None:
            raise ValueError("sparse is enabled but sparse_vectors has no stored file for this collection: "
                             "materialize it first")
        meta = fused_embeddings.metadata
        fusion = {"method": meta.get("method"), "models": json.loads(meta.get("models", "[]")),
                  "weights": json.loads(meta.get("weights", "[]"))}
        store = TelemetryStore(paths.storage_dir())
        summary_path = store.summary_path(collection)

        def summary_with_this_stage(partial: dict) -> dict:
            stages = dict(read_summary(summary_path).get("stages", {})) if summary_path.exists() else {}
            stages[EXPORTS_KEY.to_user_string()] = timer.stamp(
                record | partial | {"asset_key": EXPORTS_KEY.to_user_string(), "run_id": context.run_id,
                                    "partition": collection, "materialized_at": utc_now()})
            return build_summary(collection, stages, resolved.as_dict(), dict(resolved.provenance))

        table, stage_record = write_exports(
            export_root(paths, resolved.export_dir), collection, chunks,
            {s.name: dense_sets[s.asset_name] for s in specs}, fused_embeddings,
            fusion=fusion, sparse=sparse_vectors if sparse_specs else None,
            sparse_models=[s.name for s in sparse_specs], summary=summary_with_this_stage)
        context.log.info(f"exported {len(stage_record['files'])} files to {stage_record['export_dir']}")
        return StageOutput(table, timer.stamp(record | stage_record | {"device": "cpu"}), {
            "executed": True, "export_dir": dg.MetadataValue.path(stage_record["export_dir"]),
            "files": len(stage_record["files"]), "bytes_written": stage_record["bytes_written"],
        })

    return exports
