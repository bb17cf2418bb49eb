"""rag_clean engine: chunking, encoders, fusion, retrieval, GPU lease, storage, telemetry.

Never imports Dagster: the engine runs and is benchmarked on machines without it.
"""

__version__ = "0.1.0"
