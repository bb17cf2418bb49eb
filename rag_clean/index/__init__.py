"""The vector index sink (Qdrant's data model): the interface (base), its engines (qdrant_edge: embedded,
the default; qdrant_server: a Qdrant server through qdrant-client) and the incremental sync (sync).

    index = open_index("qdrant-edge", layout, "demo")         # or "qdrant", url=..., api_key_env=...
    hits = index.dense_search("fused", query_vector, k=10)

Engines are imported lazily: `import rag_clean.index` costs neither qdrant package.
"""

from __future__ import annotations

import os

from rag_clean.index.base import (FUSED, SINKS, Hit, IndexPoint, IndexSchema, VectorIndex, VectorIndexError,
                                  point_id, vector_name)
from rag_clean.storage.layout import StorageLayout

DEFAULT_API_KEY_ENV = "QDRANT_API_KEY"
CONNECT_TIMEOUT_S = 5.0


def open_index(sink: str, layout: StorageLayout, collection: str, *, url: str = "",
               api_key_env: str = DEFAULT_API_KEY_ENV, timeout_s: float = CONNECT_TIMEOUT_S,
               shards: int = 0) -> VectorIndex:
    """The collection's index in the chosen sink. "qdrant-edge": a shard folder under the storage root
    (StorageLayout.index_dir) of `shards` Edge shards (0: by size when created); "qdrant": the server at `url`, API key read from the environment variable
    named `api_key_env` (unset: no key). A server that does not answer within `timeout_s` raises
    VectorIndexError with one line."""
    if sink == "qdrant-edge":
        from rag_clean.index.qdrant_edge import EdgeIndex

        return EdgeIndex(layout.index_dir(collection), collection, shards)
    if sink == "qdrant":
        from rag_clean.index.qdrant_server import ServerIndex

        if not url:
            raise VectorIndexError("index_sink is 'qdrant' but qdrant_url is empty: set EMBEDDER_QDRANT_URL "
                                   "(e.g. http://127.0.0.1:6333)")
        return ServerIndex.connect(url, collection, api_key=os.environ.get(api_key_env) or None, timeout_s=timeout_s)
    raise VectorIndexError(f"index sink {sink!r} cannot be opened; expected one of {SINKS[:2]}")


def open_collection_index(settings, layout: StorageLayout, collection: str) -> VectorIndex:
    """The collection's index in the sink the settings (EmbedderSettings) choose: the vector_index asset, its
    check and search open it alike."""
    return open_index(settings.index_sink, layout, collection, url=settings.qdrant_url,
                      api_key_env=settings.qdrant_api_key_env, shards=settings.index_shards)


__all__ = ["FUSED", "SINKS", "Hit", "IndexPoint", "IndexSchema", "VectorIndex", "VectorIndexError", "open_index",
           "open_collection_index", "point_id", "vector_name", "DEFAULT_API_KEY_ENV"]
