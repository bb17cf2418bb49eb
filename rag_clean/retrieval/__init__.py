"""Retrieval over stored vectors: flat dense / sparse candidate search, hybrid fusion and tuning, ranking
metrics, embedding fusion math, and the query-side caches of the reranked stage."""
