"""sparse_vectors: SPLADE-style term weights per chunk, pruned to top-k, as term ids + weights.

A sparse model that is the joint partner of a bge-m3 dense model (same source, see
Registry.joint_sparse_partner) takes its rows from that dense stage's forward pass when it can, so the
asset depends (non-data) on those dense assets: Dagster then runs them first.
"""


import dagster as dg
import pyarrow as pa

from rag_clean.encoders.batching import BudgetStore
from rag_clean.registry import Registry
from rag_clean.stages.common import StageOutput, StageTimer
from rag_clean.stages import SPARSE_SCHEMA, run_sparse_stage, shared_sparse_sources
from rag_clean.storage import TableWriter
from rag_clean_assets.assets.common import IO_MANAGER_KEY, add_lease, asset_file, base_record, lease_target
from rag_clean_assets.assets.dense import dense_asset_key
from rag_clean_assets.partitions import collections_partitions
from resources.gpu_lease import GpuLeaseResource
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource

SPARSE_KEY = dg.AssetKey("sparse_vectors")


def selected_sparse_specs(registry: Registry, sparse_models) -> list:
    return registry.select_sparse(sparse_models)


def joint_dense_deps(registry: Registry) -> list[dg.AssetKey]:
    """Dense assets whose forward pass can also yield a sparse model's rows (bge-m3 partners)."""
    return [dense_asset_key(d) for d in registry.dense if registry.joint_sparse_partner(d) is not None]


def build_sparse_asset(registry: Registry) -> dg.AssetsDefinition:
    @dg.asset(
        key=SPARSE_KEY,
        ins={"chunks": dg.AssetIn(key="chunks")},
        deps=joint_dense_deps(registry),
        partitions_def=collections_partitions,
        io_manager_key=IO_MANAGER_KEY,
        group_name="embeddings",
        kinds={"pytorch", "parquet"},
        pool="gpu",
        description="Sparse term weights per chunk from each selected sparse model. Opt out with "
                    "EMBEDDER_ENABLE_SPARSE=0 (then nothing is written and the previous file stays). A bge-m3 "
                    "sparse model reuses the lexical rows of its dense partner's forward pass when they cover "
                    "every chunk (no second pass over the collection).",
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
        reg = registry.load()
        specs = selected_sparse_specs(reg, resolved.sparse_models)
        if not specs:
            raise ValueError("sparse is enabled but the registry names no sparse model; "
                             "add one or set EMBEDDER_ENABLE_SPARSE=0")
        shared = shared_sparse_sources(reg, specs, paths.storage_dir(), context.partition_key)
        budget_store = BudgetStore(paths.storage_dir() / "state" / "token_budgets.json")
        sink = TableWriter(asset_file(paths, SPARSE_KEY, context.partition_key), SPARSE_SCHEMA)
        with gpu_lease.lease(context) as lease:
            staged, stage_record = run_sparse_stage(specs, chunks,
                                                    lease_target(lease),
                                                    budget_store=budget_store, shared=shared, sink=sink)
        if stage_record["fallback_used"]:
            context.log.warning(stage_record["fallback_reason"])
        for name, info in stage_record["shared_pass"].items():
            context.log.info(f"{name}: rows from the forward pass of {info['dense_model']}" if info["used"]
                             else info["reason"])
        record |= stage_record
        add_lease(record, lease)
        vectors = stage_record["vectors"]
        metadata = {
            "executed": True, "models": ", ".join(stage_record["model_names"]),
            "coverage_ratio": round(vectors["available"] / vectors["total"], 6) if vectors["total"] else 0.0,
            "fallback_used": bool(stage_record["fallback_used"]),
        }
        if stage_record["shared_pass"]:
            metadata["shared_pass_with_dense"] = ", ".join(stage_record["shared_pass_with_dense"])
            metadata["shared_pass"] = dg.MetadataValue.json(stage_record["shared_pass"])
        return StageOutput(staged, timer.stamp(record), metadata)

    return sparse_vectors
