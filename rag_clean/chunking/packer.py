"""Token-budgeted packing of one section's blocks into chunk texts, with overlap."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from .config import ChunkingConfig, ChunkingError
from .markdown import Block
from .tokens import CountTokens

# Sentence ends (optionally followed by a closing quote or bracket) and line breaks.
_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))[ \t]+|[ \t]*\n\s*")
_WORD = re.compile(r"\S+")


@dataclass
class _Piece:
    """An atom of a chunk. Pieces of one block render joined by their original separators."""

    block: Block
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


class SectionPacker:
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

    def pack(self, blocks: Iterable[Block]) -> list[str]:
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
