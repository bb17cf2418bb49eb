"""sparse_vectors: SPLADE-style term weights per chunk, pruned to top-k, as term ids + weights.

A sparse model that is the joint partner of a bge-m3 dense model (same source, see
Registry.joint_sparse_partner) takes its rows from that dense stage's forward pass when it can, so the
asset depends (non-data) on those dense assets: Dagster then runs them first.
"""


import dagster as dg
import pyarrow as pa

from rag_clean.encoders.batching import BudgetStore
from rag_clean.telemetry.records import SparseRecord
from rag_clean.config.registry import Registry
from rag_clean.encoders.token_cache import TokenCache
from rag_clean.stages import run_sparse_stage, shared_sparse_sources
from rag_clean.stages.common import StageOutput, StageTimer
from rag_clean_assets.assets.common import (
    add_lease,
    encode_lease,
    lease_target,
    log_warnings,
    run_plan,
    stage_asset,
    staged_file,
    start_record,
)
from rag_clean_assets.assets.dense import dense_asset_key
from rag_clean_assets import versions
from rag_clean_assets.versions import versioned
from resources.gpu_lease import GpuLeaseResource
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource

SPARSE_KEY = dg.AssetKey("sparse_vectors")


def joint_dense_deps(registry: Registry) -> list[dg.AssetKey]:
    """Dense assets whose forward pass can also yield a sparse model's rows (bge-m3 partners)."""
    return [dense_asset_key(d) for d in registry.dense if registry.joint_sparse_partner(d) is not None]


def build_sparse_asset(registry: Registry) -> dg.AssetsDefinition:
    @dg.asset(
        key=SPARSE_KEY,
        ins={"chunks": dg.AssetIn(key="chunks")},
        deps=joint_dense_deps(registry),
        **stage_asset(group="embeddings", kinds={"pytorch", "parquet"}, code_version=versions.sparse_code_version(registry),
                      gpu=True),
        description="Sparse term weights per chunk from each selected sparse model. Opt out with "
                    "EMBEDDER_ENABLE_SPARSE=0 (then nothing is written and the previous file stays). A bge-m3 "
                    "sparse model reuses the lexical rows of its dense partner's forward pass when they cover "
                    "every chunk (no second pass over the collection).",
    )
    def sparse_vectors(context: dg.AssetExecutionContext, chunks: pa.Table, gpu_lease: GpuLeaseResource,
                       registry: ModelRegistryResource, settings: EmbedderSettingsResource,
                       paths: PathsResource) -> dg.Output[StageOutput]:
        timer = StageTimer()
        plan = run_plan(context, registry, settings)
        reason = plan.sparse_disabled_reason()
        if reason is not None:
            context.log.info(reason)
            record = SparseRecord(status="disabled", reason=reason)
            return versioned(context, StageOutput(None, timer.stamp(start_record(record, plan))))
        layout = paths.layout()
        shared = shared_sparse_sources(plan.registry, plan.sparse, layout, context.partition_key)
        target = staged_file(paths, SPARSE_KEY, context.partition_key)
        with encode_lease(gpu_lease, context, plan, remote=plan.ray is not None) as lease:
            staged, record = run_sparse_stage(plan.sparse, chunks, lease_target(lease),
                                              budget_store=BudgetStore(layout.budget_store_file()),
                                              shared=shared, sink_path=target, progress=context.log.info,
                                              previous=target if plan.reuse_unchanged else None,
                                              ray=plan.ray, digest_cache=layout.weights_digest_file(),
                                              token_cache=TokenCache.for_collection(layout, context.partition_key))
        add_lease(start_record(record, plan), lease)
        log_warnings(context, record)
        for name, info in record.shared_pass.items():
            context.log.info(f"{name}: rows from the forward pass of {info['dense_model']}" if info["used"]
                             else info["reason"])
        return versioned(context, StageOutput(staged, timer.stamp(record)))

    return sparse_vectors
