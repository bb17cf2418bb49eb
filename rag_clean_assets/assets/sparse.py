"""sparse_vectors: SPLADE-style term weights per chunk, pruned to top-k, as term ids + weights."""


import dagster as dg
import pyarrow as pa

from rag_clean.encoders.batching import BudgetStore
from rag_clean.registry import Registry
from rag_clean.stage import StageOutput, StageTimer
from rag_clean.stages import run_sparse_stage
from rag_clean_assets.assets.common import IO_MANAGER_KEY, base_record, lease_events
from rag_clean_assets.partitions import collections_partitions
from resources.gpu_lease import GpuLeaseResource
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource


def selected_sparse_specs(registry: Registry, sparse_models) -> list:
    if not sparse_models:
        return registry.sparse
    chosen = [registry.get(name) for name in sparse_models]
    wrong = [s.name for s in chosen if s.role != "sparse"]
    if wrong:
        raise ValueError(f"sparse_models names models whose role is not sparse: {wrong}")
    return chosen


@dg.asset(
    partitions_def=collections_partitions,
    io_manager_key=IO_MANAGER_KEY,
    group_name="embeddings",
    kinds={"pytorch", "parquet"},
    pool="gpu",
    description="Sparse term weights per chunk from each selected sparse model. Opt out with "
                "EMBEDDER_ENABLE_SPARSE=0 (then nothing is written and the previous file stays).",
)
def sparse_vectors(context: dg.AssetExecutionContext, chunks: pa.Table, gpu_lease: GpuLeaseResource,
                   registry: ModelRegistryResource, settings: EmbedderSettingsResource,
                   paths: PathsResource) -> StageOutput:
    timer = StageTimer()
    resolved = settings.resolve()
    record = base_record(resolved)
    if not resolved.enable_sparse:
        reason = f"sparse stage disabled: enable_sparse=false ({resolved.provenance.get('enable_sparse')})"
        context.log.info(reason)
        return StageOutput(None, timer.stamp(record | {"stage": "sparse", "status": "disabled", "reason": reason,
                                                       "rows": 0, "model_names": []}), {"executed": False})
    specs = selected_sparse_specs(registry.load(), resolved.sparse_models)
    if not specs:
        raise ValueError("sparse is enabled but the registry names no sparse model; "
                         "add one or set EMBEDDER_ENABLE_SPARSE=0")
    budget_store = BudgetStore(paths.storage_dir() / "state" / "token_budgets.json")
    with gpu_lease.lease(context) as lease:
        table, stage_record = run_sparse_stage(specs, chunks, lease.devices if len(lease.devices) > 1 else lease.device,
                                               budget_store=budget_store)
    if stage_record["fallback_used"]:
        context.log.warning(stage_record["fallback_reason"])
    record |= stage_record
    record["lease"] = lease.summary.to_dict() if lease.summary else None
    record["events"] = lease_events(lease)
    record["device"] = lease.device
    vectors = stage_record["vectors"]
    return StageOutput(table, timer.stamp(record), {
        "executed": True, "models": ", ".join(stage_record["model_names"]),
        "coverage_ratio": round(vectors["available"] / vectors["total"], 6) if vectors["total"] else 0.0,
        "fallback_used": bool(stage_record["fallback_used"]),
    })
