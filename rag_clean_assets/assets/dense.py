"""dense_embeddings/<model>: one asset per dense model of the registry, built by a factory."""


import dagster as dg
import pyarrow as pa

from rag_clean.encoders.batching import BudgetStore
from rag_clean.registry import ModelSpec
from rag_clean.stages.common import StageOutput, StageTimer
from rag_clean.stages import plan_joint_outputs, run_dense_stage
from rag_clean.storage import StorageError, read_embeddings
from rag_clean_assets.assets.common import IO_MANAGER_KEY, add_lease, asset_file, base_record, lease_target
from rag_clean_assets.partitions import collections_partitions
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
        partitions_def=collections_partitions,
        io_manager_key=IO_MANAGER_KEY,
        group_name="embeddings",
        kinds={"pytorch", "arrow"},
        pool="gpu",
        description=f"L2-normalized float32 vectors of every chunk from dense model {spec.name} "
                    f"({spec.backend}, {spec.source}). Vectors of unchanged chunks are reused.",
        metadata={"model": spec.name, "backend": spec.backend, "source": spec.source,
                  "dim": int(spec.output_dim or 0), "fusion_weight": float(spec.weight)},
    )
    def _dense(context: dg.AssetExecutionContext, chunks: pa.Table, gpu_lease: GpuLeaseResource,
               registry: ModelRegistryResource, settings: EmbedderSettingsResource, paths: PathsResource) -> StageOutput:
        timer = StageTimer()
        resolved = settings.resolve()
        reg = registry.load()
        current = reg.get(spec.name)
        if resolved.ensemble_models and spec.name not in {reg.get(n).name for n in resolved.ensemble_models}:
            reason = (f"{spec.name} is not in ensemble_models={list(resolved.ensemble_models)} "
                      f"({resolved.provenance.get('ensemble_models')}); nothing written, the previous file stays")
            context.log.info(f"dense stage skipped: {reason}")
            record = base_record(resolved) | {"stage": "dense", "model": spec.name, "status": "disabled",
                                              "reason": reason, "rows": 0}
            return StageOutput(None, timer.stamp(record), {"executed": False})
        # bge-m3 serving the sparse stage too (or asked for ColBERT): one forward pass, side files beside.
        joint = plan_joint_outputs(reg, current, sparse_enabled=resolved.enable_sparse,
                                   sparse_models=resolved.sparse_models, storage_root=paths.storage_dir(),
                                   collection=context.partition_key)
        target = asset_file(paths, key, context.partition_key)
        previous = None
        if resolved.reuse_unchanged and target.exists():
            try:
                previous = read_embeddings(target)
            except StorageError as exc:
                context.log.warning(f"previous vectors unreadable, recomputing all: {exc}")
        budget_store = BudgetStore(paths.storage_dir() / "state" / "token_budgets.json")
        with gpu_lease.lease(context) as lease:
            writer, record = run_dense_stage(current, chunks, lease_target(lease),
                                             target, previous=previous, budget_store=budget_store, joint=joint)
        record = base_record(resolved) | record
        add_lease(record, lease)
        if not resolved.exclusive_ensemble:
            record.setdefault("warnings", []).append(
                "exclusive_ensemble=false was requested; rag_clean always keeps one model per device at a time "
                "(the GPU lease); models run side by side only on different devices")
        context.log.info(f"{spec.name}: {record['reuse']['computed']} chunks embedded, {record['reuse']['reused']} reused")
        metadata = {"model": spec.name}
        if "joint" in record:
            info = record["joint"]
            for warning in info["warnings"]:
                context.log.warning(warning)
            if info["sparse_partner"]:
                context.log.info(f"{spec.name}: same pass wrote lexical rows for {info['sparse_partner']} to "
                                 f"{info['sparse_file']}")
                metadata |= {"joint_sparse_partner": info["sparse_partner"],
                             "joint_sparse_file": dg.MetadataValue.path(info["sparse_file"]),
                             "joint_sparse_rows": int(info["sparse_rows"])}
            if info["colbert_file"]:
                metadata |= {"colbert_file": dg.MetadataValue.path(info["colbert_file"]),
                             "colbert_rows": int(info["colbert_rows"]), "colbert_dim": int(info["colbert_dim"] or 0)}
            metadata["joint_extra_pass_rows"] = int(info["extra_pass_rows"])
        return StageOutput(writer, timer.stamp(record), metadata)

    return _dense
