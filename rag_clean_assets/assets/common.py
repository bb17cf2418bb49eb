"""Pieces every asset uses: the run plan, staged-file locations, the lease on a record."""


import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import dagster as dg

from rag_clean.config.plan import RunPlan, build_run_plan
from rag_clean.telemetry.records import StageRecord
from rag_clean_assets.partitions import collections_partitions
from rag_clean_assets.pods import cpu_pod_tags, gpu_pod_tags
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource

IO_MANAGER_KEY = "telemetry_io_manager"
# One collection per run: the bodies read context.partition_key and the IO manager writes one file per
# partition, so a run over a range has nothing to batch; a failed collection fails alone and is retried
# alone (docs/architecture.md, "Backfills").
warnings.filterwarnings("ignore", message=".*`backfill_policy` of function `asset` is currently in beta.*")
BACKFILL_POLICY = dg.BackfillPolicy.multi_run(max_partitions_per_run=1)

# Plans of recent runs: every asset of a run reads the same plan, built by the first step that asks.
# Keyed by run id and the resources' config, so a test that reruns with other settings gets a new plan.
_PLANS: "OrderedDict[tuple, RunPlan]" = OrderedDict()
_PLANS_KEPT = 16


def stage_asset(*, group: str, kinds: set[str], code_version: str, gpu: bool) -> dict:
    """The decorator arguments every stage asset shares: one partition per collection, stored by the
    telemetry IO manager, a code version, and its pod: GPU steps also sit in the `gpu` pool."""
    kwargs = dict(partitions_def=collections_partitions, io_manager_key=IO_MANAGER_KEY, group_name=group,
                  kinds=kinds, code_version=code_version, op_tags=gpu_pod_tags() if gpu else cpu_pod_tags(),
                  backfill_policy=BACKFILL_POLICY)
    return kwargs | ({"pool": "gpu"} if gpu else {})


def run_plan(context: dg.AssetExecutionContext, registry: ModelRegistryResource,
             settings: EmbedderSettingsResource) -> RunPlan:
    key = (context.run_id, registry.model_dump_json(), settings.model_dump_json())
    plan = _PLANS.get(key)
    if plan is None:
        plan = build_run_plan(registry.load(), settings.resolve())
        _PLANS[key] = plan
        while len(_PLANS) > _PLANS_KEPT:
            _PLANS.popitem(last=False)
    return plan


def start_record(record: StageRecord, plan: RunPlan) -> StageRecord:
    """The settings (and their sources) every stage record carries; retired settings noted once, on chunks."""
    toggles = plan.toggles()
    record.toggles, record.provenance = toggles["toggles"], toggles["provenance"]
    if record.stage == "chunks":
        record.warnings += list(plan.settings.notes)
    return record


def previous_embeddings(context: dg.AssetExecutionContext, plan: RunPlan, target: Path, unreadable: str):
    """The asset's stored matrix, memory-mapped, for reuse; None when reuse is off, there is none, or it is
    unreadable (then one warning line: `unreadable` says what happens instead)."""
    from rag_clean.storage.embeddings import read_embeddings
    from rag_clean.storage.errors import StorageError

    if not (plan.reuse_unchanged and target.exists()):
        return None
    try:
        return read_embeddings(target)
    except StorageError as exc:
        context.log.warning(f"{unreadable}: {exc}")
        return None


def staged_file(paths: PathsResource, asset_key: dg.AssetKey, collection: str) -> Path:
    """The asset's final file (folder created): streaming writers stage their temp files beside it, so the
    IO manager's publish is a rename on one filesystem."""
    return paths.layout().staged_asset_file(list(asset_key.path), collection)


@dataclass
class RemoteLease:
    """Stands in for a GPU lease when the encode runs on the Ray cluster: no local device is held."""

    devices: list[str] = field(default_factory=lambda: ["cpu"])
    device: str = "cpu"
    summary: None = None
    events: list = field(default_factory=list)


@contextmanager
def encode_lease(gpu_lease, context: dg.AssetExecutionContext, plan: RunPlan, *, remote: bool) -> Iterator:
    """The machine's GPU lease for a step that encodes here. With `remote` (the plan names a Ray cluster
    and the stage sends its work there) none: holding a local card while the work runs elsewhere would
    block other steps for nothing."""
    if not remote:
        with gpu_lease.lease(context) as lease:
            yield lease
        return
    context.log.info(f"encoding on the Ray cluster {plan.ray.address!r} ({plan.ray.actors} actors): no local GPU lease")
    yield RemoteLease()


def lease_target(lease) -> str | list[str]:
    """What the encoders take: one device string, or the list when the lease holds several GPUs."""
    return lease.devices if len(lease.devices) > 1 else lease.device


def add_lease(record: StageRecord, lease) -> StageRecord:
    """Attach a finished lease (summary computed at release, its events) to a stage record."""
    record.lease = lease.summary.to_dict() if lease.summary else None
    record.events = [{"ts": e.ts, "event": f"lease.{e.event}", "detail": {"devices": e.devices, **e.detail}}
                     for e in lease.events]
    record.device = record.device or lease.device
    return record


def log_warnings(context: dg.AssetExecutionContext, record: StageRecord) -> None:
    for warning in record.warnings:
        context.log.warning(warning)
