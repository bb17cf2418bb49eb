"""The old embedder's export files, written from stored assets."""
