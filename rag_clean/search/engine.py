"""Search a collection's vector index with the ranking `reranked` measured.

    searcher = Searcher("sample")
    for hit in searcher.search("how do I rotate the key?", k=5):
        print(hit.chunk_id, hit.score, hit.heading)

What `reranked` chose for the collection is read from its ranking state (retrieval/ranking_state.py): the
dense models and their fusion, the hybrid weights it tuned (or its documented default), the candidate pool
size, the normalization, the cross-encoder and how many candidates it reorders. The models are loaded once
per Searcher and kept between queries. A model whose fingerprint changed since `reranked` ran is refused:
its query vectors would not match the stored ones.

Query text is never logged or stored: log lines carry its keyed hash (telemetry/privacy.py) at most.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from rag_clean.config.paths import storage_root as default_storage_root
from rag_clean.config.registry import ModelSpec, Registry, RegistryError, load_registry
from rag_clean.config.settings import EmbedderSettings, resolve_settings
from rag_clean.retrieval.ranking import (encode_dense_texts, encode_sparse_texts, fused_query_vectors,
                                         model_query_vectors, rerank_order, rerank_unavailable_warning)
from rag_clean.retrieval.ranking_state import RankingState, read_ranking_state
from rag_clean.search.pool import QueryVectors, rank_pool
from rag_clean.config.models import ModelResolver
from rag_clean.storage.arrow_io import read_arrow_table
from rag_clean.storage.errors import StorageError
from rag_clean.storage.names import check_name
from rag_clean.storage.layout import StorageLayout

log = logging.getLogger(__name__)


class SearchError(ValueError):
    """Search cannot run for this collection or this input; one line says why and what to do."""


@dataclass(frozen=True)
class SearchResult:
    chunk_id: str
    score: float                  # retrieval score: the hybrid weighted sum, the RRF score or the dense cosine
    rerank_score: float | None    # the cross-encoder's score; None where it did not score this chunk
    text: str
    heading: str
    source_file: str

    def to_dict(self) -> dict:
        return asdict(self)


class Searcher:
    """One collection's index with its query encoders and reranker loaded (close() releases them)."""

    def __init__(self, collection: str, *, storage_root: str | Path | None = None,
                 registry: Registry | str | Path | None = None, settings: EmbedderSettings | None = None,
                 device: str = "cpu", index=None):
        try:
            self.collection = check_name(collection)
        except StorageError as exc:
            raise SearchError(str(exc)) from None
        self.layout = _layout(storage_root)
        # Resolved once: the fingerprints checked against the stored ranking state and the loads agree on a folder.
        self.models = ModelResolver(self.layout.weights_digest_file())
        self.registry = registry if isinstance(registry, Registry) else _load_registry(registry)
        self.settings = settings if settings is not None else resolve_settings()
        self.device = device
        self.state: RankingState = read_ranking_state(self.layout.ranking_state_file(self.collection), self.collection)
        self.warnings: list[str] = []
        self.dense_specs = [self._spec(n) for n in self.state.dense_models]
        self.sparse_specs = [self._spec(n) for n in self.state.sparse_models]
        self.rerank_spec = self._spec(self.state.rerank_model) if self.state.rerank_source else None
        self._check_fingerprints()
        self.index = index if index is not None else self._open_index()
        self._chunks = _chunks_table(self.layout, self.collection)
        self._dense, self._sparse, self._reranker, self._rerank_loaded = [], [], None, False
        try:
            self._load_encoders()
        except BaseException:
            self.close()
            raise

    # -- set-up --------------------------------------------------------------------------------

    def _spec(self, name: str) -> ModelSpec:
        try:
            return self.registry.get(name)
        except RegistryError:
            raise SearchError(f"collection {self.collection!r}: `reranked` ranked with model {name!r}, which the "
                              f"registry {self.registry.path} no longer names: rematerialize `reranked`") from None

    def _open_index(self):
        from rag_clean.index import open_collection_index

        if self.settings.index_sink == "off":
            raise SearchError(f"collection {self.collection!r}: index_sink is off "
                              f"({self.settings.provenance.get('index_sink', 'default')}): there is no index to search")
        return open_collection_index(self.settings, self.layout, self.collection)

    def _check_fingerprints(self) -> None:
        models = self.models
        now = {s.name: models.get(s).fingerprint for s in self.dense_specs}
        now |= {s.name: models.get(s).sparse_fingerprint for s in self.sparse_specs}
        if self.rerank_spec is not None:
            now[self.rerank_spec.name] = models.get(self.rerank_spec).fingerprint
        changed = sorted(n for n, fp in now.items() if self.state.fingerprints.get(n) != fp)
        if changed:
            raise SearchError(f"collection {self.collection!r}: model(s) {changed} changed (registry entry or weights) "
                              "since `reranked` ran: rematerialize the collection's assets, then search")

    def _load_encoders(self) -> None:
        from rag_clean.encoders.factory import load_dense_encoder, load_sparse_encoder

        for spec in self.dense_specs:
            self._dense.append(load_dense_encoder(spec, self.device, model=self.models.get(spec)))
        for spec in self.sparse_specs:
            self._sparse.append(load_sparse_encoder(spec, self.device, model=self.models.get(spec)))

    def _loaded_reranker(self):
        """The cross-encoder, loaded on first use through the same fallback chain `reranked` used; None (with
        the same warning `reranked` gives) when none loads."""
        if not self._rerank_loaded:
            from rag_clean.encoders.factory import load_reranker

            self._rerank_loaded = True
            self._reranker, resolution = load_reranker(self.rerank_spec, self.device)
            if self._reranker is None:
                self._warn(rerank_unavailable_warning(resolution))
            elif resolution.get("resolved") != self.state.rerank_source:
                self._warn(f"rerank: {resolution.get('resolved')} loaded, but `reranked` scored with "
                           f"{self.state.rerank_source}: scores may differ from the measured ones")
        return self._reranker

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning(message)

    # -- queries -------------------------------------------------------------------------------

    def search(self, query: str, k: int = 10, rerank: bool = True) -> list[SearchResult]:
        """The top `k` chunks for `query`. Candidates: each system's top `top_k_candidates` (at least k); with
        `rerank` (and a cross-encoder that `reranked` used), the first `rerank_top_k` reordered by it."""
        if not isinstance(query, str) or not query.strip():
            raise SearchError("query is empty")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise SearchError(f"k must be a positive integer, got {k!r}")
        pool = rank_pool(self.index, self.state, self._encode(query), max(self.state.top_k_candidates, k),
                         self._chunks)
        candidates, rerank_scores = pool.candidates, {}
        if rerank and self.state.rerank_enabled and self.rerank_spec is not None:
            reranker = self._loaded_reranker()
            if reranker is not None and candidates:
                head = candidates[: self.state.rerank_top_k]
                scores = reranker.score([(query, pool.points[d].get("text") or "") for d in head])
                rerank_scores = {d: float(s) for d, s in zip(head, scores)}
                candidates = rerank_order([candidates], [rerank_scores], self.state.rerank_top_k)[0]
        return [_result(pool.points[d], pool.scores[d], rerank_scores.get(d)) for d in candidates[:k]]

    def _encode(self, query: str) -> QueryVectors:
        per_model = [model_query_vectors(s, encode_dense_texts(e, [query], self.device, queries=True))
                     for s, e in zip(self.dense_specs, self._dense)]
        fused = fused_query_vectors(self.dense_specs, per_model, self.state.fusion_weights, self.state.fusion_method)
        sparse = [encode_sparse_texts(e, [query], self.device)[0] for e in self._sparse]
        return QueryVectors(fused, per_model, sparse)

    def close(self) -> None:
        for encoder in [*self._dense, *self._sparse, *([self._reranker] if self._reranker else [])]:
            encoder.close()
        self._dense, self._sparse, self._reranker = [], [], None
        index = getattr(self, "index", None)
        if index is not None:
            index.close()

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def searchable_collections(storage_root: str | Path | None = None) -> tuple[Path, list[str]]:
    """(storage root, the collections with a `reranked` ranking state under it, sorted)."""
    layout = _layout(storage_root)
    folder = layout.ranking_state_dir()
    names = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
    return layout.root, names


def _layout(storage_root: str | Path | None) -> StorageLayout:
    """The given storage root, else the configured one (RAG_CLEAN_STORAGE_ROOT, $DAGSTER_HOME/rag_clean, ...)."""
    return StorageLayout(Path(storage_root) if storage_root else default_storage_root())


def _result(point: dict, score: float, rerank_score: float | None) -> SearchResult:
    return SearchResult(chunk_id=str(point["chunk_id"]), score=float(score), rerank_score=rerank_score,
                        text=str(point.get("text") or ""), heading=str(point.get("heading") or ""),
                        source_file=str(point.get("source_file") or ""))


def _load_registry(path) -> Registry:
    try:
        return load_registry(str(path) if path else None)
    except RegistryError as exc:
        raise SearchError(str(exc)) from None


def _chunks_table(layout: StorageLayout, collection: str) -> pa.Table | None:
    """The chunks table (memory-mapped), for reranked's doc numbering; None where this storage root lacks it."""
    path = layout.asset_file(["chunks"], collection)
    return read_arrow_table(path) if path.exists() else None
