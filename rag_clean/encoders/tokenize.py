"""Tokenize once, ahead of the device.

- `Tokenizer` wraps a Hugging Face tokenizer (truncation, no padding, flat int32 output).
- `TokenWindow` holds one window's token ids flat (int32 + offsets) and builds padded or
  unpadded batches from any subset of rows.
- `tokenizer_fingerprint`: what a tokenizer makes of a text (its truncation aside), the key under
  which token ids may be shared between models (rag_clean.encoders.token_cache).

The runner's input, a `TokenSource` (rag_clean.encoders.tokens), builds its windows with these.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rag_clean.config.settings import process_setting
from rag_clean.encoders.base import EncoderError

# Rows tokenized per window. Small first window: the device starts after ~1k rows are tokenized
# instead of the whole window; later windows tokenize while the device works on the previous one.
DEFAULT_WINDOW_ITEMS = 8192
DEFAULT_FIRST_WINDOW_ITEMS = 1024

@dataclass
class TokenWindow:
    """Token ids of a window of inputs, stored flat: row i is ids[offsets[i]:offsets[i+1]]."""

    start: int                    # index of the window's first row in the caller's input
    ids: np.ndarray               # int32 [total_tokens]
    offsets: np.ndarray           # int64 [rows + 1]
    type_ids: np.ndarray | None   # int32 [total_tokens], only for models with token types (pairs)
    seconds: float = 0.0
    truncated: int = 0            # rows cut to the tokenizer's max_length
    cut: np.ndarray | None = None  # bool [rows]: which rows were cut (the count above, per row)
    hashes: Sequence[str] | None = None  # the rows' content hashes, when the caller gave them (TokenSource)

    @classmethod
    def from_rows(cls, start: int, id_rows: list[np.ndarray], type_rows: list[np.ndarray] | None,
                  seconds: float = 0.0) -> "TokenWindow":
        """One window from per-row int32 token ids (and token type ids)."""
        lengths = np.fromiter((len(r) for r in id_rows), dtype=np.int64, count=len(id_rows))
        offsets = np.zeros(len(id_rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        empty = np.zeros(0, dtype=np.int32)
        ids = np.concatenate(id_rows) if id_rows else empty
        types = None if type_rows is None else (np.concatenate(type_rows) if type_rows else empty)
        return cls(start=start, ids=ids, offsets=offsets, type_ids=types, seconds=seconds)

    @property
    def rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def padded(self, rows: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
        """Right-padded [b, L] input_ids / attention_mask (/ token_type_ids) for `rows`."""
        lengths = self.lengths[rows]
        width = int(lengths.max())
        positions = np.arange(width)[None, :]
        mask = positions < lengths[:, None]
        gather = np.minimum(self.offsets[rows][:, None] + positions, len(self.ids) - 1)
        input_ids = np.where(mask, self.ids[gather], pad_id).astype(np.int64)
        out = {"input_ids": input_ids, "attention_mask": mask.astype(np.int64)}
        if self.type_ids is not None:
            out["token_type_ids"] = np.where(mask, self.type_ids[gather], 0).astype(np.int64)
        return out

    def unpadded(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Concatenated ids of `rows` plus cumulative sequence lengths (varlen attention input)."""
        lengths = self.lengths[rows]
        cu = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu[1:])
        starts = self.offsets[rows]
        # Vectorized gather of each row's span: position within the row + the row's start offset.
        row_of_token = np.repeat(np.arange(len(rows)), lengths)
        within = np.arange(int(cu[-1])) - cu[:-1][row_of_token]
        flat_index = starts[row_of_token] + within
        out = {
            "input_ids": self.ids[flat_index].astype(np.int64),
            "position_ids": within.astype(np.int64),
            "cu_seqlens": cu,
            "max_seqlen": int(lengths.max()),
        }
        if self.type_ids is not None:
            out["token_type_ids"] = self.type_ids[flat_index].astype(np.int64)
        return out


def check_strings(texts: Sequence, pairs: Sequence | None, start: int) -> None:
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise EncoderError(f"input row {start + i} is {type(t).__name__}, expected str")
    for i, t in enumerate(pairs or ()):
        if not isinstance(t, str):
            raise EncoderError(f"input row {start + i}: passage is {type(t).__name__}, expected str")


def tokenizer_fingerprint(rust_tokenizer, lowercase: bool) -> str:
    """sha256 of the tokenizer's definition without its truncation / padding settings, plus the lowercase
    flag: two tokenizers with the same fingerprint give the same ids for every text."""
    spec = json.loads(rust_tokenizer.to_str())
    for key in ("truncation", "padding"):
        spec.pop(key, None)
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":")) + f"|lowercase={bool(lowercase)}"
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


class Tokenizer:
    """Wraps a Hugging Face tokenizer: truncation to `max_length`, no padding, flat int32 output.

    Fast tokenizers run through their Rust core directly (a private copy with truncation set):
    `encode_batch_fast` encodes in parallel on all cores without the GIL, and skips the Python
    dict building of `tokenizer(...)`, which was the slow part. Slow tokenizers use `tokenizer(...)`.
    """

    def __init__(self, hf_tokenizer, max_length: int, *, lowercase: bool = False, with_type_ids: bool = False,
                 threads: int | None = None):
        self.hf = hf_tokenizer
        self.max_length = int(max_length)
        self.lowercase = lowercase
        self.with_type_ids = with_type_ids
        self.threads = max(1, threads or min(8, os.cpu_count() or 1))
        self.pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else 0
        self.rust = None
        core = getattr(hf_tokenizer, "_tokenizer", None) if getattr(hf_tokenizer, "is_fast", False) else None
        if core is not None and process_setting("rust_tokenizer"):
            from tokenizers import Tokenizer as RustTokenizer

            self.rust = RustTokenizer.from_str(core.to_str())
            self.rust.no_padding()
            self.rust.enable_truncation(self.max_length, strategy="longest_first")
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str | None:
        """Identity of what this tokenizer makes of a text (its max_length aside); None for slow tokenizers
        or token-type models (pairs), which the token cache does not serve."""
        if self.rust is None or self.with_type_ids:
            return None
        if self._fingerprint is None:
            self._fingerprint = tokenizer_fingerprint(self.rust, self.lowercase)
        return self._fingerprint

    def encode_chunk(self, texts: list[str], pairs: list[str] | None = None):
        """(id rows, type rows | None, cut flags) of `texts` (and `pairs`), in one call."""
        if self.lowercase:
            texts = [t.lower() for t in texts]
            pairs = None if pairs is None else [p.lower() for p in pairs]
        if self.rust is not None:
            inputs = texts if pairs is None else list(zip(texts, pairs))
            encode = getattr(self.rust, "encode_batch_fast", self.rust.encode_batch)
            encs = encode(inputs, add_special_tokens=True)
            ids = [np.asarray(e.ids, dtype=np.int32) for e in encs]
            types = [np.asarray(e.type_ids, dtype=np.int32) for e in encs] if self.with_type_ids else None
            return ids, types, [bool(e.overflowing) for e in encs]
        enc = self.hf(
            texts,
            pairs,
            truncation=True if pairs is None else "longest_first",
            max_length=self.max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=self.with_type_ids,
        )
        ids = [np.asarray(r, dtype=np.int32) for r in enc["input_ids"]]
        types = [np.asarray(r, dtype=np.int32) for r in enc["token_type_ids"]] if self.with_type_ids else None
        # Slow tokenizers do not say what they cut: a row that fills max_length counts as truncated.
        return ids, types, [len(r) >= self.max_length for r in ids]

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None, start: int = 0) -> TokenWindow:
        t0 = time.perf_counter()
        texts = list(texts)
        pairs = None if pairs is None else list(pairs)
        check_strings(texts, pairs, start)
        n = len(texts)
        if self.rust is not None:
            # One call: the Rust core spreads it over all cores without the GIL. (Several calls in
            # flight from threads measured no faster on a 16-core H100 host.)
            chunks = [(texts, pairs)]
        else:
            step = max(256, -(-n // self.threads))
            chunks = [(texts[i:i + step], None if pairs is None else pairs[i:i + step]) for i in range(0, n, step)]
        if len(chunks) <= 1:
            results = [self.encode_chunk(*c) for c in chunks]
        else:
            with ThreadPoolExecutor(len(chunks)) as pool:
                results = list(pool.map(lambda c: self.encode_chunk(*c), chunks))
        id_rows = [r for ids, _, _ in results for r in ids]
        type_rows = [r for _, ty, _ in results for r in ty] if self.with_type_ids else None
        window = TokenWindow.from_rows(start, id_rows, type_rows, seconds=time.perf_counter() - t0)
        window.cut = np.fromiter((c for _, _, cut in results for c in cut), dtype=bool, count=n)
        window.truncated = int(window.cut.sum())
        return window
