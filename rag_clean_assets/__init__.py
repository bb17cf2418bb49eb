"""Dagster wiring for rag_clean: assets, partitions, checks, sensors, jobs, Definitions."""
