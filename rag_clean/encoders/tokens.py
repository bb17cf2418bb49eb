"""The runner's input: a `TokenSource` yields windows of token ids, tokenized one window ahead of the device.

A source is the rows to encode (texts, optional passages for pairs) plus, when the caller has them, each
row's content hash (the chunks asset's `content_hash`). With a token cache pass
(rag_clean.encoders.token_cache) the ids of known rows are read by those hashes: the texts are neither
hashed again nor, for a window whose rows are all known, even read. Without one, the tokenizer runs.

Windows are built on a background thread, one ahead of the consumer, so host memory stays flat in
collection size (one or two windows of token ids, never the whole collection) and the device never
waits for the tokenizer.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from rag_clean.encoders.base import EncoderError
from rag_clean.encoders.tokenize import DEFAULT_WINDOW_ITEMS, TokenWindow, check_strings


class CachedIds(Protocol):
    """A token cache pass as a source reads it (rag_clean.encoders.token_cache.TokenCachePass)."""

    tokenizer: object

    def lookup(self, hashes: list[str], tokenize: Callable[[list[int]], tuple]) -> tuple[list[np.ndarray], np.ndarray]:
        """(id rows, cut flags bool [rows]) for `hashes`; `tokenize(missing positions)` gives (ids, types, cuts)
        for the rows the cache cannot serve."""


class TokenSource:
    """Rows to encode and where their token ids come from; `windows(tokenizer, ...)` is what the runner reads."""

    def __init__(self, texts: Sequence[str], *, pairs: Sequence[str] | None = None,
                 hashes: Sequence[str] | None = None, cache: CachedIds | None = None):
        if pairs is not None and len(pairs) != len(texts):
            raise EncoderError(f"token source: {len(texts)} texts but {len(pairs)} passages")
        if hashes is not None and len(hashes) != len(texts):
            raise EncoderError(f"token source: {len(texts)} texts but {len(hashes)} content hashes")
        if cache is not None and (hashes is None or pairs is not None):
            raise EncoderError("token source: a token cache serves single texts keyed by their content hashes")
        self.texts, self.pairs, self.hashes, self.cache = texts, pairs, hashes, cache

    @classmethod
    def of(cls, rows: "TokenSource | Sequence[str]") -> "TokenSource":
        """`rows` if it is a source already, else a plain source over a sequence of texts."""
        return rows if isinstance(rows, TokenSource) else cls(rows)

    def __len__(self) -> int:
        return len(self.texts)

    def window(self, tokenizer, start: int, stop: int) -> TokenWindow:
        """Token ids of rows [start, stop)."""
        hashes = None if self.hashes is None else list(self.hashes[start:stop])
        if self.cache is None:
            window = tokenizer.encode(self.texts[start:stop], None if self.pairs is None else self.pairs[start:stop],
                                      start=start)
        else:
            if self.cache.tokenizer is not tokenizer:
                raise EncoderError("token source: its token cache pass was opened for another tokenizer")
            t0 = time.perf_counter()
            texts: list[str] | None = None

            def tokenize(missing: list[int]):
                nonlocal texts
                if texts is None:  # only a window with rows the cache lacks reads its texts
                    texts = list(self.texts[start:stop])
                    check_strings(texts, None, start)
                return tokenizer.encode_chunk([texts[i] for i in missing])

            id_rows, cut = self.cache.lookup(hashes, tokenize)
            window = TokenWindow.from_rows(start, id_rows, None, seconds=time.perf_counter() - t0)
            window.cut, window.truncated = cut, int(cut.sum())
        window.hashes = hashes
        return window

    def windows(self, tokenizer, window: int = DEFAULT_WINDOW_ITEMS,
                first_window: int | None = None) -> Iterator[TokenWindow]:
        """Windows of `window` rows (the first of `first_window`), in order; the next one is built on a
        background thread while the caller works on the current one."""
        bounds = window_bounds(len(self), window, first_window)
        if not bounds:
            return
        results: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def produce():
            try:
                for s, e in bounds:
                    if stop.is_set():
                        return
                    results.put(("ok", self.window(tokenizer, s, e)))
            except BaseException as exc:  # surfaced in the consumer
                results.put(("error", exc))

        thread = threading.Thread(target=produce, name="tokenize-ahead", daemon=True)
        thread.start()
        try:
            for _ in bounds:
                kind, value = results.get()
                if kind == "error":
                    raise value
                yield value
        finally:
            stop.set()
            # Drain so a producer blocked on put() can see `stop` and exit.
            while thread.is_alive():
                try:
                    results.get(timeout=0.05)
                except queue.Empty:
                    pass


def window_bounds(n: int, window: int, first_window: int | None = None) -> list[tuple[int, int]]:
    """(start, end) of each window: a first window of `first_window` rows, then `window` rows each."""
    first = min(window, first_window or window)
    bounds, start = [], 0
    while start < n:
        end = min(n, start + (first if start == 0 else window))
        bounds.append((start, end))
        start = end
    return bounds
