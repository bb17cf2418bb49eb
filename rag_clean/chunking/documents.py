"""Chunk Markdown and plain-text documents into rows: structure, then packing per section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ChunkingConfig, SkipRecord
from .markdown import Section, parse_markdown, parse_plain_text, strip_front_matter
from .packer import SectionPacker
from .rows import make_row
from .tokens import CountTokens, approx_token_count


def _chunk_document(
    sections: list[Section],
    source_file: str,
    content_type: str,
    config: ChunkingConfig,
    count_tokens: CountTokens,
    skipped: list[SkipRecord] | None,
    extra_metadata: dict[str, Any] | None = None,
) -> list[dict]:
    rows: list[dict] = []
    for i, section in enumerate(sections):
        body = [b for b in section.blocks if b.kind != "heading"]
        if not body:
            following = sections[i + 1] if i + 1 < len(sections) else None
            is_parent = following is not None and following.path[: len(section.path)] == section.path and (
                len(following.path) > len(section.path)
            )
            # A heading with only sub-sections lives on in their section_path; a heading with no
            # text at all is reported.
            if section.heading is not None and not is_parent and skipped is not None:
                skipped.append(SkipRecord(source_file, None, f"section {' > '.join(section.path)!r} has no text"))
            continue
        where = f"{source_file} section {' > '.join(section.path) or '(before first heading)'!r}"
        for text in SectionPacker(config, count_tokens, where).pack(section.blocks):
            index = len(rows)
            tokens = count_tokens(text)
            metadata = {
                "source_file": source_file,
                "chunk_index": index,
                "heading_text": section.heading,
                "section_path": list(section.path),
                "char_count": len(text),
                "token_count": tokens,
                "content_type": content_type,
                **(extra_metadata or {}),
            }
            rows.append(
                make_row(f"{source_file}#{index}", text, source_file, index, section.heading, section.path, tokens, metadata)
            )
    return rows


def chunk_markdown(
    text: str,
    source_file: str,
    config: ChunkingConfig = ChunkingConfig(),
    count_tokens: CountTokens | None = None,
    skipped: list[SkipRecord] | None = None,
) -> list[dict]:
    """Chunk one Markdown document into CHUNK_SCHEMA rows (dicts), ids `<source_file>#<chunk_index>`.

    Heading-aware (ATX and setext; `#` inside code fences is code): each chunk stays inside one
    section and carries its heading and section_path. The first chunk of a section starts with
    its heading line. Sections without text are not chunked (reported in `skipped` when they
    have no sub-sections either). YAML front matter goes to metadata["front_matter"]; a document
    that is only front matter gives no rows (reported in `skipped`).
    """
    count = count_tokens or approx_token_count
    body, front_matter = strip_front_matter(text.replace("\r\n", "\n").replace("\r", "\n"))
    extra = {"front_matter": front_matter} if front_matter is not None else None
    if front_matter is not None and not body.strip():
        if skipped is not None:
            skipped.append(SkipRecord(source_file, None, "front matter only, no text to embed"))
        return []
    return _chunk_document(parse_markdown(body), source_file, "markdown", config, count, skipped, extra)


def chunk_plain_text(
    text: str,
    source_file: str,
    config: ChunkingConfig = ChunkingConfig(),
    count_tokens: CountTokens | None = None,
) -> list[dict]:
    """Chunk a plain-text document by paragraphs; heading and section_path are the file stem."""
    count = count_tokens or approx_token_count
    title = Path(source_file).stem
    normalized = text.replace("\r\n", "\n").replace("\r", "\n")
    return _chunk_document(parse_plain_text(normalized, title), source_file, "text", config, count, None)
