"""Data root (collection folders) and storage root (asset files) as one Dagster resource."""


from pathlib import Path

import dagster as dg

from rag_clean import paths
from rag_clean.layout import StorageLayout
from rag_clean.storage import StorageError, check_name, path_under


class PathsResource(dg.ConfigurableResource):
    """Empty strings mean the environment defaults (see rag_clean.paths)."""

    data_root: str = ""
    storage_root: str = ""

    def data_dir(self) -> Path:
        return Path(self.data_root).expanduser().resolve() if self.data_root else paths.data_root()

    def storage_dir(self) -> Path:
        return Path(self.storage_root).expanduser().resolve() if self.storage_root else paths.storage_root()

    def collection_dir(self, collection: str) -> Path:
        folder = path_under(self.data_dir(), check_name(collection))
        if not folder.is_dir():
            raise StorageError(f"collection {collection!r}: folder {folder} does not exist under the data root")
        return folder

    def layout(self) -> StorageLayout:
        """Every path under the storage root (asset files, side files, state, telemetry, exports)."""
        return StorageLayout(self.storage_dir())

    def scan_collections(self) -> tuple[list[str], list[str]]:
        """(usable collection names, folders whose names cannot be partition keys) under the data root."""
        root = self.data_dir()
        if not root.is_dir():
            return [], []
        names, unusable = [], []
        for child in sorted(root.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                try:
                    names.append(check_name(child.name))
                except StorageError:
                    unusable.append(child.name)
        return names, unusable

    def collections(self) -> list[str]:
        return self.scan_collections()[0]
