"""rag_clean engine: config/, chunking/, encoders/, gpu/, stages/, storage/, retrieval/, telemetry/, exports/, distributed/,
and processes.py (whether a pid still runs: dead writers' temp files, dead runs' pool slots).

Never imports Dagster: the engine runs and is benchmarked on machines without it.
"""

__version__ = "0.1.0"
