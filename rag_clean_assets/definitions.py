"""The Definitions: assets built from the model registry, checks, job, sensor, resources.

Built by a function, not at import: importing this module reads no setting and no registry, so rag-clean
can report a bad RAG_CLEAN_* value or registry as one line, and `--registry` replaces the environment's.
`dagster ... -m rag_clean_assets.definitions` and workspace.yaml load `defs` (an `@dg.definitions`
function) when they need the graph.
"""

from __future__ import annotations

import dagster as dg

from rag_clean.config.declaration import BY_KEY
from rag_clean.config.registry import load_registry
from rag_clean.config.settings import given_process_settings, process_setting
from rag_clean_assets.assets.chunks import build_chunks_asset
from rag_clean_assets.assets.dense import build_dense_asset
from rag_clean_assets.assets.exports import build_exports_asset
from rag_clean_assets.assets.fused import build_fused_asset
from rag_clean_assets.assets.index import build_index_asset
from rag_clean_assets.assets.retrieval import build_queries_asset, build_reranked_asset
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
    return _assets(load_registry(registry_path), automation_enabled() if automation is None else automation)


def _assets(registry, automation: bool) -> list:
    assets = [collection_files, build_chunks_asset(registry), *(build_dense_asset(s) for s in registry.dense),
              build_fused_asset(registry), build_sparse_asset(registry), build_queries_asset(),
              build_reranked_asset(registry), build_exports_asset(registry),
              build_index_asset(registry)]
    return with_automation(assets) if automation else assets


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


EXECUTORS = BY_KEY["executor"].choices


def default_executor():
    """In process by default: GPU steps run one at a time anyway (pool "gpu", exclusive ensemble), and a
    process per step costs a torch import each (the sample job: 30 s in process vs 190 s on 2 cores).
    RAG_CLEAN_EXECUTOR=multiprocess runs CPU-only steps side by side and isolates each step's memory;
    with a `gpu` pool limit N on an N-GPU host, N GPU steps (models or collections) run on N cards.
    RAG_CLEAN_EXECUTOR=k8s: one pod per step (dagster-k8s), pod requirements from rag_clean_assets/pods.py."""
    name = process_setting("executor")
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
    """loggers: Dagster loggers for every run (None: the short console logger,
    INFO unless the log_level setting says otherwise), e.g. rag-clean's progress bars.
    A bad RAG_CLEAN_* value fails here (loading the code location), not in the step that reads it."""
    given_process_settings()
    registry = load_registry(registry_path)
    automation = automation_enabled() if automation is None else automation
    assets = _assets(registry, automation)
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


@dg.definitions
def defs() -> dg.Definitions:
    """What `dagster ... -m rag_clean_assets.definitions`, workspace.yaml and the webserver load."""
    return build_definitions()
