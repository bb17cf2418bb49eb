"""Data root (collection folders) and storage root (asset files) as one Dagster resource."""


from pathlib import Path

import dagster as dg

from rag_clean.config import paths
from rag_clean.storage.layout import StorageLayout
from rag_clean.storage.errors import StorageError
from rag_clean.storage.names import check_name


class PathsResource(dg.ConfigurableResource):
    """Empty strings mean the environment defaults (see rag_clean.config.paths)."""

    data_root: str = ""
    storage_root: str = ""

    def data_dir(self) -> Path:
        return Path(self.data_root).expanduser().resolve() if self.data_root else paths.data_root()

    def storage_dir(self) -> Path:
        """The storage root, refused (SettingsError) when it lies inside the data root."""
        root = Path(self.storage_root).expanduser().resolve() if self.storage_root else paths.storage_root()
        paths.check_roots(self.data_dir(), root)
        return root

    def collection_dir(self, collection: str) -> Path:
        root = self.data_dir()
        folder = (root / check_name(collection)).resolve()
        if root not in folder.parents:  # a symlinked folder may point anywhere: refuse what leaves the root
            raise StorageError(f"collection {collection!r}: its folder is a symlink to {folder}, which resolves "
                               f"outside the data root {root}; refused")
        if not folder.is_dir():
            raise StorageError(f"collection {collection!r}: folder {folder} does not exist under the data root")
        return folder

    def layout(self) -> StorageLayout:
        """Every path under the storage root (asset files, side files, state, telemetry, exports)."""
        return StorageLayout(self.storage_dir())

    def scan_collections(self) -> tuple[list[str], list[tuple[str, str]]]:
        """(usable collection names, [(folder name, why it is not a collection)]) under the data root.

        Every folder under the data root is one or the other, so nothing is dropped unreported.
        A symlinked folder counts if it resolves inside the data root; one that resolves outside
        is refused (it would let a collection read any folder the process can). Plain files are
        not folders and are ignored.
        """
        root = self.data_dir()
        if not root.is_dir():
            return [], []
        names, unusable = [], []
        for child in sorted(root.iterdir()):
            if not child.is_dir():
                continue
            target = child.resolve()
            if target != root and root not in target.parents:
                unusable.append((child.name, f"symlink to {target} resolves outside the data root {root}"))
            elif child.name.startswith("."):
                unusable.append((child.name, "hidden folder (name starts with '.')"))
            else:
                try:
                    names.append(check_name(child.name))
                except StorageError:
                    unusable.append((child.name, "name is not usable as a collection name "
                                                 "(letters, digits, '.', '_', '-'; no '..')"))
        return names, unusable

    def collections(self) -> list[str]:
        return self.scan_collections()[0]
