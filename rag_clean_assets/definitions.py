"""The Definitions object: assets built from the model registry, checks, job, sensor, resources."""

from __future__ import annotations

import os

import dagster as dg

from rag_clean.config.registry import load_registry
from rag_clean_assets.assets.chunks import chunks
from rag_clean_assets.assets.dense import build_dense_asset
from rag_clean_assets.assets.exports import build_exports_asset
from rag_clean_assets.assets.fused import build_fused_asset
from rag_clean_assets.assets.retrieval import build_reranked_asset, queries
from rag_clean_assets.assets.sparse import build_sparse_asset
from rag_clean_assets.automation import automation_enabled, automation_sensor, with_automation
from rag_clean_assets.checks import build_checks
from rag_clean_assets.console_log import short_console_logger_def
from rag_clean_assets.observe import collection_files
from rag_clean_assets.partitions import collections_partitions
from rag_clean_assets.sensors import build_collection_sensor
from rag_clean_assets import staleness  # noqa: F401  (per-partition staleness in this process too)
from resources.gpu_lease import GpuLeaseResource
from resources.io_manager import TelemetryIOManager
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource

EMBED_JOB_NAME = "embed_collection"
CHECK_JOB_NAME = "check_collection"



def build_assets(registry_path: str | None = None, *, automation: bool | None = None) -> list:
    """The asset graph; `automation` (default: $RAG_CLEAN_AUTOMATION) puts the refresh condition on it."""
    registry = load_registry(registry_path)
    assets = [collection_files, chunks, *(build_dense_asset(s) for s in registry.dense), build_fused_asset(registry),
              build_sparse_asset(registry), queries, build_reranked_asset(registry), build_exports_asset(registry)]
    return with_automation(assets) if (automation_enabled() if automation is None else automation) else assets


def build_resources(*, data_root: str = "", storage_root: str = "", registry_path: str = "",
                    settings: EmbedderSettingsResource | None = None, gpu_lease: GpuLeaseResource | None = None) -> dict:
    paths = PathsResource(data_root=data_root, storage_root=storage_root)
    return {
        "paths": paths,
        "registry": ModelRegistryResource(path=registry_path),
        "settings": settings or EmbedderSettingsResource(),
        "gpu_lease": gpu_lease or GpuLeaseResource(),
        "telemetry_io_manager": TelemetryIOManager(paths=paths),
    }


EXECUTORS = ("in_process", "multiprocess", "k8s")


def default_executor():
    """In process by default: GPU steps run one at a time anyway (pool "gpu", exclusive ensemble), and a
    process per step costs a torch import each (the sample job: 30 s in process vs 190 s on 2 cores).
    RAG_CLEAN_EXECUTOR=multiprocess runs CPU-only steps side by side and isolates each step's memory;
    with a `gpu` pool limit N on an N-GPU host, N GPU steps (models or collections) run on N cards.
    RAG_CLEAN_EXECUTOR=k8s: one pod per step (dagster-k8s), pod requirements from rag_clean_assets/pods.py."""
    name = os.environ.get("RAG_CLEAN_EXECUTOR", "in_process") or "in_process"
    if name not in EXECUTORS:
        raise ValueError(f"RAG_CLEAN_EXECUTOR={name!r}: expected one of {EXECUTORS}")
    if name == "multiprocess":
        return dg.multiprocess_executor
    if name == "k8s":
        try:  # lazily: dagster-k8s is an optional extra, needed only on a cluster
            from dagster_k8s import k8s_job_executor
        except ImportError as exc:
            raise ImportError("RAG_CLEAN_EXECUTOR=k8s needs dagster-k8s (docs/scaling.md, \"On Kubernetes\")") from exc
        return k8s_job_executor
    return dg.in_process_executor


def build_definitions(registry_path: str | None = None, *, automation: bool | None = None,
                      loggers: dict | None = None, **resource_kwargs) -> dg.Definitions:
    """loggers: Dagster loggers for every run (None: the short console logger, INFO unless
    $RAG_CLEAN_LOG_LEVEL), e.g. rag-clean's progress bars."""
    registry = load_registry(registry_path)
    automation = automation_enabled() if automation is None else automation
    assets = build_assets(registry_path, automation=automation)
    job = dg.define_asset_job(EMBED_JOB_NAME, selection=dg.AssetSelection.all(),
                              partitions_def=collections_partitions,
                              description="Materialize every asset of one collection.")
    # Checks alone, one collection per run: Dagster 1.13's UI greys out "Execute" for the checks of a partitioned
    # asset, so they run from this job's launchpad (pick the partition) without materializing anything.
    check_job = dg.define_asset_job(CHECK_JOB_NAME, selection=dg.AssetSelection.all_asset_checks(),
                                    partitions_def=collections_partitions,
                                    description="Run every asset check of one collection on the stored files.")
    return dg.Definitions(
        assets=assets,
        asset_checks=build_checks(registry),
        jobs=[job, check_job],
        sensors=[build_collection_sensor(job), *([automation_sensor()] if automation else [])],
        resources=build_resources(registry_path=registry_path or "", **resource_kwargs),
        executor=default_executor(),
        loggers=loggers if loggers is not None else {"console": short_console_logger_def()},
    )


defs = build_definitions()
