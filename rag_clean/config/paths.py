"""Where things live: the data root (collection folders) and the storage root (asset files).

RAG_CLEAN_DATA_ROOT     folder whose sub-folders are collections (default: the bundled data/collections)
RAG_CLEAN_STORAGE_ROOT  where asset files, telemetry and locks go (default: $DAGSTER_HOME/rag_clean,
                        else .rag_clean/ under the project)
"""

from __future__ import annotations

import os
from pathlib import Path

from rag_clean.config.settings import SettingsError, process_setting

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_DATA_ROOT = PROJECT_ROOT / "data" / "collections"
# The Dagster instance `rag-clean` uses when DAGSTER_HOME is not set (so its storage root is <this>/rag_clean).
DEFAULT_DAGSTER_HOME = PROJECT_ROOT / ".dagster_home"


def data_root() -> Path:
    return Path(process_setting("data_root") or BUNDLED_DATA_ROOT).expanduser().resolve()


def storage_root() -> Path:
    explicit = process_setting("storage_root")
    if explicit:
        return Path(explicit).expanduser().resolve()
    if os.environ.get("DAGSTER_HOME"):
        return (Path(os.environ["DAGSTER_HOME"]).expanduser() / "rag_clean").resolve()
    return (PROJECT_ROOT / ".rag_clean" / "storage").resolve()


def check_roots(data: Path, storage: Path) -> None:
    """Refuse a storage root at or inside the data root: it would sit inside a collection folder (whose
    next read would take the run's own files, events.jsonl included, as input) or be scanned as one."""
    data, storage = data.expanduser().resolve(), storage.expanduser().resolve()
    if storage == data or data in storage.parents:
        inside = storage.relative_to(data).parts
        where = ("the data root itself" if not inside else "a folder of the data root (a collection to the "
                 "sensor)" if len(inside) == 1 else f"inside the collection folder {data / inside[0]}")
        raise SettingsError(f"storage root {storage} is {where} (data root {data}): choose a storage root "
                            f"outside the data root (RAG_CLEAN_STORAGE_ROOT or --storage-root)")
