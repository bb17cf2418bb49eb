"""Read a collection folder into one table of chunks (the `chunks` stage).

Three input kinds, found recursively (hidden files and folders ignored):

* the old embedder's chunk files `*_chunks.json`: a JSON list of {"text", "metadata": {"chunk_id", ...}};
* JSONL: one object per line with "text", optional "id", every other field kept as metadata;
* Markdown / plain-text documents that are chunked here: heading-aware, token-budgeted, with overlap.

Bad input raises `ChunkingError` naming the file (path relative to the collection) and the record
index or line. Empty texts and files of other types are skipped, and every skip is reported in
`ChunkingResult.skipped`, never dropped silently.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa

CountTokens = Callable[[str], int]

CHUNK_SCHEMA = pa.schema(
    [
        ("chunk_id", pa.string()),  # stable: same input -> same id
        ("text", pa.string()),  # the text that gets embedded
        ("content_hash", pa.string()),  # sha256 hex of `text`
        ("source_file", pa.string()),  # relative to the collection folder, forward slashes
        ("chunk_index", pa.int32()),  # index within its source file
        ("heading", pa.string()),  # nearest heading text (nullable)
        ("section_path", pa.list_(pa.string())),  # heading trail, outermost first
        ("token_count", pa.int32()),
        ("metadata_json", pa.string()),  # all original metadata as JSON (sorted keys)
    ]
)


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


# --------------------------------------------------------------------------- tokens and hashes

# Word runs and single punctuation marks. A WordPiece / BPE vocabulary keeps short common words
# whole and cuts longer or rarer ones (identifiers, paths, hashes) into pieces of a few characters.
_TOKEN_PIECE = re.compile(r"\w+|[^\w\s]")
_WHOLE_WORD_CHARS = 6
_CHARS_PER_PIECE = 4


def approx_token_count(text: str) -> int:
    """Fast, tokenizer-free token estimate used when no `count_tokens` is given.

    One token per punctuation mark and per word of up to 6 characters; a longer word counts
    ceil(len / 4). Measured on the bundled sample collection against the bert-base-uncased
    WordPiece count (no [CLS]/[SEP]) it overestimates by ~12% overall and underestimates no
    chunk by more than 5%; the largest 256-budget chunk there is 248 real tokens. Pass a real
    tokenizer's length function as `count_tokens` where the budget must be exact.
    """
    total = 0
    for match in _TOKEN_PIECE.finditer(text):
        length = match.end() - match.start()
        total += 1 if length <= _WHOLE_WORD_CHARS else math.ceil(length / _CHARS_PER_PIECE)
    return total


def content_hash(text: str) -> str:
    """sha256 hex digest of the UTF-8 bytes of `text`."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- markdown structure

_FENCE_OPEN = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*$")
_ATX_CLOSING = re.compile(r"(?:^|[ \t]+)#+[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
# A paragraph that starts as a list item or quote cannot become a setext heading ("- a\n---" is a rule).
_LIST_OR_QUOTE = re.compile(r"^ {0,3}(?:[-*+][ \t]|\d{1,9}[.)][ \t]|>)")
# Sentence ends (optionally followed by a closing quote or bracket) and line breaks.
_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))[ \t]+|[ \t]*\n\s*")
_WORD = re.compile(r"\S+")


@dataclass
class _Block:
    kind: str  # "prose" | "heading" | "code"
    text: str  # prose / heading text; for code the lines between the fences
    fence_open: str = ""
    fence_close: str = ""


@dataclass
class _Section:
    level: int
    heading: str | None
    path: list[str]
    blocks: list[_Block] = field(default_factory=list)


def _fence_closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    # Up to 3 spaces of indent, same fence character, at least as long, nothing after it.
    return (
        len(line) - len(line.lstrip(" ")) <= 3
        and len(stripped) >= len(fence)
        and set(stripped) == {fence[0]}
    )


def _parse_markdown(text: str) -> list[_Section]:
    """Split a Markdown document into sections (text before the first heading is section 0)."""
    sections = [_Section(level=0, heading=None, path=[])]
    trail: list[tuple[int, str]] = []
    paragraph: list[str] = []
    fence: str | None = None
    fence_open = ""
    code_lines: list[str] = []

    def flush_paragraph() -> None:
        if paragraph:
            sections[-1].blocks.append(_Block("prose", "\n".join(paragraph)))
            paragraph.clear()

    def open_section(level: int, title: str) -> None:
        while trail and trail[-1][0] >= level:
            trail.pop()
        trail.append((level, title))
        section = _Section(level=level, heading=title, path=[t for _, t in trail])
        section.blocks.append(_Block("heading", "#" * level + " " + title if title else "#" * level))
        sections.append(section)

    for line in text.split("\n"):
        if fence is not None:
            if _fence_closes(line, fence):
                sections[-1].blocks.append(_Block("code", "\n".join(code_lines), fence_open, line.strip()))
                fence, code_lines = None, []
            else:
                code_lines.append(line)
            continue
        match = _FENCE_OPEN.match(line)
        if match and not (match.group(1)[0] == "`" and "`" in match.group(2)):
            flush_paragraph()
            fence, fence_open = match.group(1), line.strip()
            continue
        match = _ATX.match(line)
        if match:
            flush_paragraph()
            title = _ATX_CLOSING.sub("", match.group(2) or "").strip()
            open_section(len(match.group(1)), title)
            continue
        match = _SETEXT.match(line)
        if match and paragraph and not _LIST_OR_QUOTE.match(paragraph[0]):
            title = " ".join(p.strip() for p in paragraph)
            paragraph.clear()
            open_section(1 if match.group(1)[0] == "=" else 2, title)
            continue
        if not line.strip():
            flush_paragraph()
            continue
        paragraph.append(line)
    if fence is not None:  # unclosed fence runs to the end of the document (CommonMark); close it in the chunk
        sections[-1].blocks.append(_Block("code", "\n".join(code_lines), fence_open, fence))
    flush_paragraph()
    return sections


def _parse_plain_text(text: str, title: str) -> list[_Section]:
    blocks = [_Block("prose", para.strip("\n")) for para in re.split(r"\n[ \t]*\n", text) if para.strip()]
    return [_Section(level=0, heading=title, path=[title], blocks=blocks)]


def _strip_front_matter(text: str) -> tuple[str, str | None]:
    """YAML front matter (`---` ... `---`) is document metadata, not text to embed."""
    if not text.startswith("---\n"):
        return text, None
    end = re.search(r"^(?:---|\.\.\.)[ \t]*$", text[4:], flags=re.MULTILINE)
    if end is None:
        return text, None
    return text[4 + end.end():].lstrip("\n"), text[4:4 + end.start()].rstrip("\n")


# --------------------------------------------------------------------------- token-budgeted packing


@dataclass
class _Piece:
    """An atom of a chunk. Pieces of one block render joined by their original separators."""

    block: _Block
    text: str
    sep: str  # whitespace that preceded this piece inside its block
    level: int  # 0 whole block, 1 sentence / code line, 2 word, 3 characters


def _finer(piece: _Piece) -> list[_Piece] | None:
    """Split a piece at the next finer boundary: sentence/line, then word, then characters."""
    text, level = piece.text, piece.level
    if level == 0:
        if piece.block.kind == "code":
            lines = text.split("\n")
            if len(lines) > 1:
                return [
                    _Piece(piece.block, line, piece.sep if i == 0 else "\n", 1)
                    for i, line in enumerate(lines)
                ]
        else:
            parts = _split_keep_separators(text, _SENTENCE_BREAK)
            if len(parts) > 1:
                return [
                    _Piece(piece.block, part, piece.sep if i == 0 else sep, 1)
                    for i, (sep, part) in enumerate(parts)
                ]
        level = 1
    if level == 1:
        words = list(_WORD.finditer(text))
        if len(words) > 1:
            pieces = []
            for i, word in enumerate(words):
                # The first word keeps the leading indent (code) after the piece's own separator.
                sep = piece.sep + text[: word.start()] if i == 0 else text[words[i - 1].end(): word.start()]
                pieces.append(_Piece(piece.block, word.group(), sep, 2))
            return pieces
        text = text.strip() or text
    if len(text) <= 1:
        return None
    mid = len(text) // 2
    return [
        _Piece(piece.block, text[:mid], piece.sep, 3),
        _Piece(piece.block, text[mid:], "", 3),
    ]


def _split_keep_separators(text: str, pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    """[(separator_before, part), ...]; separators are kept so pieces re-join to the original."""
    parts, start, sep = [], 0, ""
    for match in pattern.finditer(text):
        if match.start() > start:
            parts.append((sep, text[start: match.start()]))
            sep = match.group()
        else:
            sep += match.group()
        start = match.end()
    if start < len(text):
        parts.append((sep, text[start:]))
    return parts


def _render(pieces: list[_Piece]) -> str:
    """Join pieces: one group per block (its pieces re-joined by their own separators), groups by a blank line."""
    groups: list[str] = []
    current: list[_Piece] = []

    def close_group() -> None:
        if not current:
            return
        body = current[0].text + "".join(p.sep + p.text for p in current[1:])
        block = current[0].block
        if block.kind == "code":
            # Every part of a split code block is re-fenced so each chunk is valid Markdown.
            body = block.fence_open + "\n" + (body + "\n" if body else "") + block.fence_close
        groups.append(body)
        current.clear()

    for piece in pieces:
        if current and piece.block is not current[0].block:
            close_group()
        current.append(piece)
    close_group()
    return "\n\n".join(groups)


@dataclass
class _Chunk:
    overlap: list[_Piece]  # tail of the previous chunk of the same section, repeated
    pieces: list[_Piece]  # this chunk's own content

    @property
    def all(self) -> list[_Piece]:
        return self.overlap + self.pieces


class _SectionPacker:
    """Greedy packing of one section's blocks into chunks of at most `max_tokens`.

    Whole blocks first; a block that does not fit an empty chunk is split at sentence / line,
    then word, then character boundaries (code: at line boundaries; only a single line longer
    than the whole budget is cut inside). Each chunk after the first starts with the tail of
    the previous one (up to `overlap_tokens`: whole words of prose, whole lines of code); the
    overlap shrinks where a whole block would otherwise have to be split. Every candidate is
    measured as rendered text, so the budget holds for any `count_tokens`, including real
    tokenizers whose counts are not additive.
    """

    def __init__(self, config: ChunkingConfig, count_tokens: CountTokens, where: str) -> None:
        self.config = config
        self.count = count_tokens
        self.where = where
        self.chunks: list[_Chunk] = []
        self.current = _Chunk([], [])

    def fits(self, pieces: list[_Piece]) -> bool:
        return self.count(_render(pieces)) <= self.config.max_tokens

    def tail(self, pieces: list[_Piece]) -> list[_Piece]:
        """The longest tail of `pieces` within overlap_tokens, never a heading, a partial word or code line."""
        if self.config.overlap_tokens <= 0:
            return []
        taken: list[_Piece] = []
        stack = list(pieces)
        while stack:
            piece = stack.pop()
            if piece.block.kind == "heading":
                break
            if self.count(_render([piece] + taken)) <= self.config.overlap_tokens:
                taken.insert(0, piece)
                continue
            finest = 1 if piece.block.kind == "code" else 2
            smaller = _finer(piece) if piece.level < finest else None
            if not smaller or smaller[0].level > finest:
                break
            stack.extend(smaller)
        return taken

    def pack(self, blocks: Iterable[_Block]) -> list[str]:
        for block in blocks:
            self.place(_Piece(block, block.text, "", 0))
        if self.current.pieces:
            self.chunks.append(self.current)
        self.merge_small_tail()
        return [_render(chunk.all) for chunk in self.chunks]

    def start_next_chunk(self) -> None:
        self.chunks.append(self.current)
        self.current = _Chunk(self.tail(self.current.all), [])

    def place(self, piece: _Piece) -> None:
        current = self.current
        if self.fits(current.all + [piece]):
            current.pieces.append(piece)
            return
        whole_fits = self.fits([piece])
        # A heading alone is no chunk: split the block that follows it rather than move it on.
        heading_only = all(p.block.kind == "heading" for p in current.pieces)
        if whole_fits and current.pieces and not heading_only:
            self.start_next_chunk()
            current = self.current
        if whole_fits and not current.pieces:
            # Keep the block whole and give up part of the overlap rather than split the block.
            while not self.fits(current.all + [piece]):
                current.overlap.pop(0)
            current.pieces.append(piece)
            return
        # Too big for any chunk (or it would strand a heading): split it and keep filling this chunk.
        smaller = _finer(piece)
        if smaller is None:
            raise ChunkingError(
                f"{self.where}: max_tokens={self.config.max_tokens} is too small to hold even "
                f"{piece.text!r} (count_tokens says {self.count(_render([piece]))})"
            )
        self.place_all(smaller)

    def place_all(self, pieces: list[_Piece]) -> None:
        """Place pieces in order, appending the longest run that fits in one go.

        Galloping then bisecting keeps a long paragraph of word pieces at O(log n) token counts
        per chunk instead of one count per word (assumes counts grow as text is appended).
        """
        i = 0
        while i < len(pieces):
            base = self.current.all
            fits_upto = 0
            step = 1
            while i + fits_upto < len(pieces):
                trial = min(fits_upto + step, len(pieces) - i)
                if not self.fits(base + pieces[i:i + trial]):
                    low, high = fits_upto, trial  # fits at low, not at high
                    while high - low > 1:
                        mid = (low + high) // 2
                        low, high = (mid, high) if self.fits(base + pieces[i:i + mid]) else (low, mid)
                    fits_upto = low
                    break
                fits_upto, step = trial, step * 2
            if fits_upto:
                self.current.pieces.extend(pieces[i:i + fits_upto])
                i += fits_upto
            else:
                self.place(pieces[i])  # starts the next chunk or splits this piece further
                i += 1

    def merge_small_tail(self) -> None:
        """Give a last chunk smaller than min_chunk_tokens more text from the one before it."""
        minimum = self.config.min_chunk_tokens
        if len(self.chunks) < 2 or minimum <= 0:
            return
        prev, last = self.chunks[-2], self.chunks[-1]
        while self.count(_render(last.pieces)) < minimum:
            if self.fits(prev.all + last.pieces):
                self.chunks[-2:] = [_Chunk(prev.overlap, prev.pieces + last.pieces)]
                return
            if len(prev.pieces) > 1:
                keep = prev.pieces[:-1]
                moved = [prev.pieces[-1]] + last.pieces
                overlap = self.tail(prev.overlap + keep)
                if self.count(_render(keep)) >= minimum and self.fits(overlap + moved):
                    prev, last = _Chunk(prev.overlap, keep), _Chunk(overlap, moved)
                    self.chunks[-2:] = [prev, last]
                    continue
            smaller = _finer(prev.pieces[-1])
            if smaller is None:
                return  # no split keeps both within budget: keep the small chunk
            prev = _Chunk(prev.overlap, prev.pieces[:-1] + smaller)


def _chunk_document(
    sections: list[_Section],
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
        for text in _SectionPacker(config, count_tokens, where).pack(section.blocks):
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
                _row(f"{source_file}#{index}", text, source_file, index, section.heading, section.path, tokens, metadata)
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
    have no sub-sections either). YAML front matter goes to metadata["front_matter"].
    """
    count = count_tokens or approx_token_count
    body, front_matter = _strip_front_matter(text.replace("\r\n", "\n").replace("\r", "\n"))
    extra = {"front_matter": front_matter} if front_matter is not None else None
    return _chunk_document(_parse_markdown(body), source_file, "markdown", config, count, skipped, extra)


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
    return _chunk_document(_parse_plain_text(normalized, title), source_file, "text", config, count, None)


def _row(chunk_id, text, source_file, index, heading, section_path, tokens, metadata) -> dict:
    return {
        "chunk_id": chunk_id,
        "text": text,
        "content_hash": content_hash(text),
        "source_file": source_file,
        "chunk_index": index,
        "heading": heading,
        "section_path": list(section_path),
        "token_count": tokens,
        "metadata_json": json.dumps(metadata, sort_keys=True, ensure_ascii=False),
    }


# --------------------------------------------------------------------------- record files


def _mapped_fields(metadata: dict, where: str, heading_keys: tuple[str, ...]) -> dict:
    """Typed copies of the metadata fields that have their own column; wrong types are errors."""
    out: dict[str, Any] = {}
    for key in heading_keys:
        value = metadata.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ChunkingError(f"{where}: metadata {key!r} must be a string, got {type(value).__name__}")
        out["heading"] = value
        break
    path = metadata.get("section_path")
    if path is not None:
        if not isinstance(path, list) or not all(isinstance(p, str) for p in path):
            raise ChunkingError(f"{where}: metadata 'section_path' must be a list of strings")
        out["section_path"] = path
    for key in ("chunk_index", "token_count"):
        value = metadata.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ChunkingError(f"{where}: metadata {key!r} must be a non-negative integer, got {value!r}")
        out[key] = value
    return out


def _read_chunk_file(
    raw: str, rel: str, count_tokens: CountTokens, skipped: list[SkipRecord]
) -> list[tuple[dict, str]]:
    try:
        records = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ChunkingError(f"{rel}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(records, list):
        raise ChunkingError(f"{rel}: expected a JSON list of chunk records, got {type(records).__name__}")
    if not records:
        skipped.append(SkipRecord(rel, None, "chunk file holds no records"))
    rows = []
    for i, record in enumerate(records):
        where = f"{rel} record index {i}"
        if not isinstance(record, dict):
            raise ChunkingError(f"{where}: expected an object, got {type(record).__name__}")
        text = record.get("text")
        if not isinstance(text, str):
            raise ChunkingError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        metadata = record.get("metadata")
        if not isinstance(metadata, dict):
            raise ChunkingError(f"{where}: 'metadata' must be an object, got {type(metadata).__name__}")
        chunk_id = metadata.get("chunk_id")
        if not isinstance(chunk_id, str) or not chunk_id.strip():
            raise ChunkingError(f"{where}: metadata.chunk_id is missing or not a non-empty string")
        if not text.strip():
            skipped.append(SkipRecord(rel, i, f"empty text (chunk_id {chunk_id!r})"))
            continue
        mapped = _mapped_fields(metadata, where, ("heading_text",))
        # Other top-level keys of a record are metadata too: nothing is dropped.
        extra = {k: v for k, v in record.items() if k not in ("text", "metadata")}
        kept = {**metadata, **({"record_fields": extra} if extra else {})}
        row = _row(
            chunk_id,
            text,
            rel,
            mapped.get("chunk_index", i),
            mapped.get("heading"),
            mapped.get("section_path", []),
            mapped.get("token_count", count_tokens(text)),
            kept,
        )
        rows.append((row, where))
    return rows


def _read_jsonl(raw: str, rel: str, count_tokens: CountTokens, skipped: list[SkipRecord]) -> list[tuple[dict, str]]:
    rows = []
    ordinal = 0
    for lineno, line in enumerate(raw.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{rel} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ChunkingError(f"{where}: invalid JSON at column {exc.colno}: {exc.msg}") from exc
        if not isinstance(record, dict):
            raise ChunkingError(f"{where}: expected a JSON object, got {type(record).__name__}")
        text = record.get("text")
        if not isinstance(text, str):
            raise ChunkingError(f"{where}: 'text' is missing or not a string")
        index, ordinal = ordinal, ordinal + 1
        raw_id = record.get("id")
        if raw_id is None:
            chunk_id = f"{rel}:{lineno}"
        elif isinstance(raw_id, str) and raw_id.strip():
            chunk_id = raw_id
        elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
            chunk_id = str(raw_id)
        else:
            raise ChunkingError(f"{where}: 'id' must be a non-empty string or an integer, got {raw_id!r}")
        if not text.strip():
            skipped.append(SkipRecord(rel, lineno, f"empty text (chunk_id {chunk_id!r})"))
            continue
        metadata = {k: v for k, v in record.items() if k not in ("text", "id")}
        mapped = _mapped_fields(metadata, where, ("heading_text", "heading", "title"))
        row = _row(
            chunk_id,
            text,
            rel,
            index,
            mapped.get("heading"),
            mapped.get("section_path", []),
            mapped.get("token_count", count_tokens(text)),
            metadata,
        )
        rows.append((row, where))
    return rows


# --------------------------------------------------------------------------- the collection


def _file_kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(".json"):
        return "chunks"
    if lower.endswith(".jsonl"):
        return "jsonl"
    if lower.endswith((".md", ".markdown")):
        return "markdown"
    if lower.endswith(".txt"):
        return "text"
    return None


def _walk(folder: Path) -> list[str]:
    """Relative paths (forward slashes) of non-hidden files, sorted; symlinked folders not followed."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith("."):
                found.append(Path(root, name).relative_to(folder).as_posix())
    return sorted(found)


def read_collection(
    folder: Path,
    config: ChunkingConfig = ChunkingConfig(),
    count_tokens: CountTokens | None = None,
) -> ChunkingResult:
    """Read every supported file under `folder` into one CHUNK_SCHEMA table.

    Rows are ordered by source file, then by position in the file (= chunk_index for documents
    and JSONL; chunk files keep their record order, their chunk_index comes from metadata).
    """
    count = count_tokens or approx_token_count
    folder = Path(folder)
    if not folder.is_dir():
        raise ChunkingError(f"collection folder {folder} does not exist or is not a directory")
    rows: list[dict] = []
    skipped: list[SkipRecord] = []
    files_read: list[str] = []
    first_seen: dict[str, str] = {}
    for rel in _walk(folder):
        name = rel.rsplit("/", 1)[-1]
        if name in config.exclude_names:
            continue
        kind = _file_kind(name) if any(fnmatch.fnmatch(name, g) for g in config.include_globs) else None
        if kind is None:
            skipped.append(SkipRecord(rel, None, "unsupported file type"))
            continue
        try:
            raw = (folder / rel).read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ChunkingError(f"{rel}: not valid UTF-8 (byte offset {exc.start}: {exc.reason})") from exc
        except OSError as exc:  # unreadable file, broken symlink
            raise ChunkingError(f"{rel}: cannot be read: {exc.strerror or exc}") from exc
        files_read.append(rel)
        if kind == "chunks":
            located = _read_chunk_file(raw, rel, count, skipped)
        elif kind == "jsonl":
            located = _read_jsonl(raw, rel, count, skipped)
        else:
            if not raw.strip():
                skipped.append(SkipRecord(rel, None, "empty document"))
                continue
            chunker = chunk_markdown if kind == "markdown" else chunk_plain_text
            kwargs = {"skipped": skipped} if kind == "markdown" else {}
            located = [(row, f"{rel} chunk {row['chunk_index']}") for row in chunker(raw, rel, config, count, **kwargs)]
        for row, where in located:
            earlier = first_seen.get(row["chunk_id"])
            if earlier is not None:
                raise ChunkingError(f"duplicate chunk_id {row['chunk_id']!r}: in {earlier} and in {where}")
            first_seen[row["chunk_id"]] = where
            rows.append(row)
    if not rows:
        raise ChunkingError(
            f"collection folder {folder} yielded no chunks "
            f"({len(files_read)} files read, {len(skipped)} skipped)"
        )
    return ChunkingResult(table=pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA), skipped=skipped, files_read=files_read)
