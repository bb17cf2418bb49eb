"""Search over a collection's vector index with the ranking `reranked` measures (engine; no Dagster).

    from rag_clean.search import Searcher
    with Searcher("sample") as searcher:
        results = searcher.search("how do I restore a snapshot?", k=10)

engine: the Searcher (models loaded once, ranking state read, fingerprints checked); pool: one query's
candidates from the index ranked by the shared code of rag_clean/retrieval/ranking.py.
"""

from rag_clean.search.engine import SearchError, SearchResult, Searcher

__all__ = ["SearchError", "SearchResult", "Searcher"]
