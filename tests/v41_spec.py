"""The old embedder's processing_summary v4.1 layout, as the parity issue states it: tests check
the product against this literal spec, not against the product's own constants."""

V41_NESTED = {
    "feature_toggles": {"enable_rerank", "enable_sparse", "sparse_models", "provenance", "provenance_lines"},
    "dense_run": {"total_embeddings_generated", "models_executed", "device", "batch_size", "latency_seconds"},
    "rerank_run": {"enabled", "executed", "status", "model_name", "fallback_count", "fallback_reason", "device_state"},
    "sparse_run": {"enabled", "model_names", "vectors", "devices", "latency_ms", "fallback_used"},
    "compatibility": {"current", "legacy", "warnings"},
    "telemetry": {"spans", "metrics"},
}
