"""Pieces every asset uses: the decorator arguments, the run plan, and `run_asset` (one call per body)."""


from collections import OrderedDict

import dagster as dg

from rag_clean.config.settings import process_setting
from rag_clean.config.plan import RunPlan, build_run_plan
from rag_clean.stages.context import Stage, StageContext, run_stage
from rag_clean_assets.partitions import collections_partitions
from rag_clean_assets.pods import cpu_pod_tags, gpu_pod_tags
from rag_clean_assets.versions import versioned
from resources.gpu_lease import GpuLeaseResource
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource

IO_MANAGER_KEY = "telemetry_io_manager"
# No backfill policy: without one, a backfill (and the automation sensor) requests one plain run per collection,
# tagged `dagster/partition` (a policy, even multi_run(1), makes range runs tagged
# `dagster/asset_partition_range_start/end` instead), which the run queue's one-run-per-collection limit
# and the console log's `[collection]` read (docs/architecture.md, "Backfills").

# Plans of recent runs: every asset of a run reads the same plan, built by the first step that asks.
# Keyed by run id and the resources' config, so a test that reruns with other settings gets a new plan.
_PLANS: "OrderedDict[tuple, RunPlan]" = OrderedDict()
_PLANS_KEPT = 16


def owners() -> list[str]:
    """Asset owners shown in the catalog (the `owners` setting: comma-separated emails or team:name)."""
    return [o.strip() for o in str(process_setting("owners")).split(",") if o.strip()]


def stage_asset(*, group: str, kinds: set[str], code_version: str, gpu: bool, tags: dict | None = None) -> dict:
    """The decorator arguments every stage asset shares: one partition per collection, stored by the
    telemetry IO manager, a code version, owners and a `stage` tag (plus `model` where one model makes it),
    and its pod: GPU steps also sit in the `gpu` pool."""
    kwargs = dict(partitions_def=collections_partitions, io_manager_key=IO_MANAGER_KEY, group_name=group,
                  kinds=kinds, code_version=code_version, op_tags=gpu_pod_tags() if gpu else cpu_pod_tags(),
                  owners=owners(),
                  tags={"stage": group, "device": "gpu" if gpu else "cpu", **(tags or {})})
    return kwargs | ({"pool": "gpu"} if gpu else {})


def run_plan(context: dg.AssetExecutionContext, registry: ModelRegistryResource,
             settings: EmbedderSettingsResource, paths: PathsResource) -> RunPlan:
    key = (context.run_id, registry.model_dump_json(), settings.model_dump_json(), paths.model_dump_json())
    plan = _PLANS.get(key)
    if plan is None:
        plan = build_run_plan(registry.load(), settings.resolve(), paths.layout().weights_digest_file())
        _PLANS[key] = plan
        while len(_PLANS) > _PLANS_KEPT:
            _PLANS.popitem(last=False)
    return plan


def run_asset(context: dg.AssetExecutionContext, stage: Stage, *inputs, paths: PathsResource,
              registry: ModelRegistryResource, settings: EmbedderSettingsResource,
              gpu_lease: GpuLeaseResource | None = None) -> dg.Output:
    """An asset body: the stage run for this partition (rag_clean.stages.context.run_stage), with its data
    version and status tag. The GPU lease resource is handed to the engine as a callable."""
    collection = context.partition_key
    ctx = StageContext(
        collection=collection, plan=run_plan(context, registry, settings, paths), layout=paths.layout(),
        lease=(lambda: gpu_lease.lease(context)) if gpu_lease is not None else None,
        progress=context.log.info, log=context.log, collection_dir=lambda: paths.collection_dir(collection),
        run_id=context.run_id)
    return versioned(context, run_stage(ctx, stage, *inputs))

