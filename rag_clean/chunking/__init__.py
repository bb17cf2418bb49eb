"""Read a collection folder into one table of chunks (the `chunks` stage).

Three input kinds, found recursively (hidden files and folders, and symlinks that resolve outside
the data root, are skipped and counted):

* the old embedder's chunk files `*_chunks.json`: a JSON list of {"text", "metadata": {"chunk_id", ...}};
* JSONL: one object per line with "text", optional "id", every other field kept as metadata;
* Markdown / plain-text documents that are chunked here: heading-aware, token-budgeted, with overlap.

Bad input raises `ChunkingError` naming the file (path relative to the collection) and the record
index or line. Empty texts, front-matter-only documents and files of other types are skipped; every skip is in
`ChunkingResult.skipped`, never dropped silently.

Modules, one concern each: `markdown` (document structure), `packer` (token budget and overlap),
`documents` (the two together, per document), `readers` (chunk files and JSONL), `jsonl_pool` /
`jsonl_worker` (a big JSONL file read in byte ranges on worker processes, same rows; off unless `jsonl_workers`), `collection`
(the folder walk: `stream_collection` streams files into a `ColumnSpool`, parsing only files changed
since the previous manifest; `read_collection` is the small in-memory form), `duplicates` (repeated chunk
ids found in a sorted scratch file, no set of every id), with `config`, `rows` and
`tokens` shared by them. Import from this package.
"""

from .collection import read_collection
from .config import ChunkingConfig, ChunkingError, ChunkingResult, SkipRecord
from .documents import chunk_markdown, chunk_plain_text
from .rows import CHUNK_SCHEMA, content_hash
from .tokens import CountTokens, approx_token_count

__all__ = [
    "CHUNK_SCHEMA",
    "ChunkingConfig",
    "ChunkingError",
    "ChunkingResult",
    "CountTokens",
    "SkipRecord",
    "approx_token_count",
    "chunk_markdown",
    "chunk_plain_text",
    "content_hash",
    "read_collection",
]
