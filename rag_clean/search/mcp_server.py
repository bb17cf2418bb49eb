"""`rag-clean mcp`: an MCP server over stdio (the official `mcp` SDK) with two tools.

- `search(collection, query, k=10, rerank=true)`: the Searcher's results (chunk_id, score, rerank_score, text,
  heading, source_file), ranked as `reranked` measured;
- `list_collections()`: the collections that can be searched (a `reranked` ranking state under the storage root).

One Searcher per collection, created on first use and kept (its models stay loaded); calls run one at a time
(the SDK runs sync tools in worker threads; the encoders are not made for concurrent forwards). The server
logs at WARNING: the SDK's failure lines carry only our error messages, which never contain the query.
"""

from __future__ import annotations

import threading
from pathlib import Path

from typing_extensions import TypedDict  # pydantic (the SDK's output schemas) refuses typing.TypedDict before 3.12

from rag_clean.config.settings import EmbedderSettings
from rag_clean.search.engine import Searcher, searchable_collections

SERVER_NAME = "rag-clean"
INSTRUCTIONS = ("Search document collections embedded by rag-clean. Call list_collections for the names, then "
                "search(collection, query, k). Results are ranked by hybrid dense + sparse retrieval and a "
                "cross-encoder, as the collection's evaluation measured.")


class Result(TypedDict):
    chunk_id: str
    score: float
    rerank_score: float | None
    text: str
    heading: str
    source_file: str


class SearchReply(TypedDict):
    collection: str
    results: list[Result]
    warnings: list[str]


class CollectionsReply(TypedDict):
    collections: list[str]
    storage_root: str


class Searchers:
    """Searchers by collection, built on first use, one call at a time."""

    def __init__(self, storage_root: Path | None, registry, settings: EmbedderSettings | None, device: str):
        self.storage_root, self.registry, self.settings, self.device = storage_root, registry, settings, device
        self._by_name: dict[str, Searcher] = {}
        self.lock = threading.Lock()

    def get(self, collection: str) -> Searcher:
        searcher = self._by_name.get(collection)
        if searcher is None:
            searcher = Searcher(collection, storage_root=self.storage_root, registry=self.registry,
                                settings=self.settings, device=self.device)
            self._by_name[collection] = searcher
        return searcher

    def close(self) -> None:
        for searcher in self._by_name.values():
            searcher.close()
        self._by_name.clear()


def build_server(searchers: Searchers):
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    server = MCPServer(name=SERVER_NAME, instructions=INSTRUCTIONS, log_level="WARNING")

    @server.tool(name="search", description="Top-k chunks of a collection for a query (hybrid retrieval, then "
                                            "cross-encoder rerank unless rerank=false).")
    def search(collection: str, query: str, k: int = 10, rerank: bool = True) -> SearchReply:
        with searchers.lock:
            try:
                searcher = searchers.get(collection)
                seen = len(searcher.warnings)
                results = searcher.search(query, k=k, rerank=rerank)
            except (ValueError, RuntimeError) as exc:  # SearchError, RankingStateError, VectorIndexError, ...
                raise ToolError(str(exc)) from None
            return SearchReply(collection=collection, results=[Result(**r.to_dict()) for r in results],
                               warnings=searcher.warnings[seen:])

    @server.tool(name="list_collections", description="Names of the collections that can be searched.")
    def list_collections() -> CollectionsReply:
        root, names = searchable_collections(searchers.storage_root)
        return CollectionsReply(collections=names, storage_root=str(root))

    return server


def serve(*, storage_root: Path | None = None, registry=None, settings: EmbedderSettings | None = None,
          device: str = "cpu") -> None:
    """Serve over stdin / stdout until the client closes stdin."""
    searchers = Searchers(storage_root, registry, settings, device)
    try:
        build_server(searchers).run("stdio")
    finally:
        searchers.close()
