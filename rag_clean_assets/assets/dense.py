"""dense_embeddings/<model>: one asset per dense model of the registry, built by a factory."""


import dagster as dg
import pyarrow as pa

from rag_clean.encoders.batching import BudgetStore
from rag_clean.telemetry.records import DenseRecord
from rag_clean.config.registry import ModelSpec
from rag_clean.encoders.token_cache import TokenCache
from rag_clean.stages import joint_outputs, run_dense_stage
from rag_clean.stages.common import StageOutput, StageTimer
from rag_clean_assets.assets.common import (
    add_lease,
    encode_lease,
    lease_target,
    log_warnings,
    previous_embeddings,
    run_plan,
    stage_asset,
    staged_file,
    start_record,
)
from rag_clean_assets import versions
from rag_clean_assets.versions import versioned
from resources.gpu_lease import GpuLeaseResource
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource


def dense_asset_key(spec: ModelSpec) -> dg.AssetKey:
    return dg.AssetKey(["dense_embeddings", spec.asset_name])


def build_dense_asset(spec: ModelSpec) -> dg.AssetsDefinition:
    key = dense_asset_key(spec)

    @dg.asset(
        key=key,
        ins={"chunks": dg.AssetIn(key="chunks")},
        **stage_asset(group="embeddings", kinds={"pytorch", "arrow"}, code_version=versions.dense_code_version(spec),
                      gpu=True, tags={"model": spec.asset_name}),
        description=f"L2-normalized float32 vectors of every chunk from dense model {spec.name} "
                    f"({spec.backend}, {spec.source}). Vectors of unchanged chunks are reused.",
        metadata={"model": spec.name, "backend": spec.backend, "source": spec.source,
                  "dim": int(spec.output_dim or 0), "fusion_weight": float(spec.weight)},
    )
    def _dense(context: dg.AssetExecutionContext, chunks: pa.Table, gpu_lease: GpuLeaseResource,
               registry: ModelRegistryResource, settings: EmbedderSettingsResource, paths: PathsResource) -> dg.Output[StageOutput]:
        timer = StageTimer()
        plan = run_plan(context, registry, settings)
        current = plan.dense_spec(spec.name)
        reason = plan.dense_disabled_reason(current)
        if reason is not None:
            context.log.info(f"dense stage skipped: {reason}")
            record = DenseRecord(model=spec.name, status="disabled", reason=reason)
            return versioned(context, StageOutput(None, timer.stamp(start_record(record, plan))))
        layout = paths.layout()
        # bge-m3 serving the sparse stage too (or asked for ColBERT): one forward pass, side files beside.
        joint = joint_outputs(plan.joint(current), layout, current, context.partition_key)
        target = staged_file(paths, key, context.partition_key)
        previous = previous_embeddings(context, plan, target, "previous vectors unreadable, recomputing all")
        # A bge-m3 joint pass always runs here (rag_clean.distributed shards single-output encodes only).
        with encode_lease(gpu_lease, context, plan, remote=plan.ray is not None and joint is None) as lease:
            writer, record = run_dense_stage(current, chunks, lease_target(lease), target, previous=previous,
                                             budget_store=BudgetStore(layout.budget_store_file()), joint=joint,
                                             ray=plan.ray, progress=context.log.info,
                                             digest_cache=layout.weights_digest_file(),
                                             token_cache=TokenCache.for_collection(layout, context.partition_key))
        add_lease(start_record(record, plan), lease)
        log_warnings(context, record)
        if record.joint is not None:
            info = record.joint
            if info["sparse_partner"]:
                context.log.info(f"{spec.name}: same pass wrote lexical rows for {info['sparse_partner']} to "
                                 f"{info['sparse_file']}")
        return versioned(context, StageOutput(writer, timer.stamp(record)))

    return _dense
