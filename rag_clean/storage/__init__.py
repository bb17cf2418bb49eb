"""What lands on disk and how: atomic staged writers and readers (Arrow IPC, Parquet), the storage layout
(every path), file digests and content-hash reuse."""
