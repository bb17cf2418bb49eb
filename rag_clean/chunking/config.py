"""What the chunker is told (`ChunkingConfig`) and what it reports back (result, skips, errors)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa


@dataclass(frozen=True)
class ChunkingConfig:
    max_tokens: int = 256  # token budget per chunk for .md/.txt documents
    overlap_tokens: int = 32  # overlap between consecutive chunks of one section
    min_chunk_tokens: int = 8  # smaller trailing fragments merge into the previous chunk
    include_globs: tuple[str, ...] = ("*_chunks.json", "*.jsonl", "*.md", "*.markdown", "*.txt")
    exclude_names: tuple[str, ...] = ("queries.jsonl",)  # the collection's query file is not a document

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"ChunkingConfig.max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.overlap_tokens < self.max_tokens:
            raise ValueError(
                f"ChunkingConfig.overlap_tokens must be in [0, max_tokens), got {self.overlap_tokens}"
                f" with max_tokens {self.max_tokens}"
            )
        if not 0 <= self.min_chunk_tokens < self.max_tokens:
            raise ValueError(
                f"ChunkingConfig.min_chunk_tokens must be in [0, max_tokens), got {self.min_chunk_tokens}"
            )


class ChunkingError(ValueError):
    """A collection file cannot be read; the message names the file and the record index / line."""


@dataclass
class SkipRecord:
    file: str
    index: int | None  # record index (chunk files), line number (JSONL), None for a whole file / section
    reason: str


@dataclass
class ChunkingResult:
    table: pa.Table
    skipped: list[SkipRecord] = field(default_factory=list)
    files_read: list[str] = field(default_factory=list)
