"""Where things live: the data root (collection folders) and the storage root (asset files).

RAG_CLEAN_DATA_ROOT     folder whose sub-folders are collections (default: the bundled data/collections)
RAG_CLEAN_STORAGE_ROOT  where asset files, telemetry and locks go (default: $DAGSTER_HOME/rag_clean,
                        else .rag_clean/ under the project)
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_DATA_ROOT = PROJECT_ROOT / "data" / "collections"
# The Dagster instance `rag-clean` uses when DAGSTER_HOME is not set (so its storage root is <this>/rag_clean).
DEFAULT_DAGSTER_HOME = PROJECT_ROOT / ".dagster_home"


def data_root() -> Path:
    return Path(os.environ.get("RAG_CLEAN_DATA_ROOT") or BUNDLED_DATA_ROOT).expanduser().resolve()


def storage_root() -> Path:
    explicit = os.environ.get("RAG_CLEAN_STORAGE_ROOT")
    if explicit:
        return Path(explicit).expanduser().resolve()
    if os.environ.get("DAGSTER_HOME"):
        return (Path(os.environ["DAGSTER_HOME"]).expanduser() / "rag_clean").resolve()
    return (PROJECT_ROOT / ".rag_clean" / "storage").resolve()
