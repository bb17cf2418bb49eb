"""Pieces every asset uses: the stage record's common fields and the staged-file location."""


from pathlib import Path

import dagster as dg

from rag_clean.settings import EmbedderSettings
from resources.io_manager import suffix_for
from resources.paths import PathsResource

IO_MANAGER_KEY = "telemetry_io_manager"


def base_record(settings: EmbedderSettings) -> dict:
    return {"toggles": settings.as_dict(), "provenance": dict(settings.provenance)}


def asset_file(paths: PathsResource, asset_key: dg.AssetKey, collection: str) -> Path:
    """The asset's final file (folder created). Streaming writers stage their temp files beside it, so the
    IO manager's publish is a rename on one filesystem."""
    final = paths.asset_file(list(asset_key.path), collection, suffix_for(list(asset_key.path)))
    final.parent.mkdir(parents=True, exist_ok=True)
    return final


def lease_target(lease) -> str | list[str]:
    """What the encoders take: one device string, or the list when the lease holds several GPUs."""
    return lease.devices if len(lease.devices) > 1 else lease.device


def add_lease(record: dict, lease) -> dict:
    """Attach a finished lease (summary computed at release, its events) to a stage record."""
    record["lease"] = lease.summary.to_dict() if lease.summary else None
    record["events"] = [{"ts": e.ts, "event": f"lease.{e.event}", "detail": {"devices": e.devices, **e.detail}}
                        for e in lease.events]
    record.setdefault("device", lease.device)
    return record
