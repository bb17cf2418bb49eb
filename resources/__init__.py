"""Dagster resources and IO managers: thin adapters over the rag_clean engine."""

from resources.gpu_lease import GpuLeaseResource
from resources.io_manager import TelemetryIOManager
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource

__all__ = ["GpuLeaseResource", "TelemetryIOManager", "PathsResource", "ModelRegistryResource", "EmbedderSettingsResource"]
