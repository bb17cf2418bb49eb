"""What lands on disk and how, one concern per module (import from the module, nothing is re-exported here):
names (name safety, paths under a root), errors (what a failure says), atomic (temp names, fsync + rename,
stale temp clean-up), staged (the staged-file protocol every writer implements), parquet, arrow_io,
embeddings (formats and their writers), digests (file sha256 cache), caches (unreadable caches are
discarded), reuse (content-hash matching), layout (every path)."""
