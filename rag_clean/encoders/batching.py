"""Tokenize-once, length-sorted, token-budget batching with OOM backoff.

Shared by every sentence-transformers-style backend (dense, sparse, rerank):

- `tokenize_windows` tokenizes the input in windows on a background thread, one window
  ahead of the device, so host memory stays flat in collection size (one or two windows of
  token ids, never the whole collection) and the device never waits for the tokenizer.
- `TokenWindow` holds one window's token ids flat (int32 + offsets) and builds padded or
  unpadded device batches from any subset of rows.
- `BatchSource` hands out length-sorted batches bounded by a token budget (items x padded
  length), lazily, so a budget change after an OOM re-splits what is left.
- `BudgetController` starts from a budget (given, remembered in a `BudgetStore`, sized to free
  device memory, or a CPU default), halves it on CUDA OOM and retries the same items.
"""

from __future__ import annotations

import json
import os
import queue
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

DEFAULT_CPU_TOKEN_BUDGET = 8192
DEFAULT_CUDA_TOKEN_BUDGET_CAP = 131072
# Rows tokenized per window. Small first window: the device starts after ~1k rows are tokenized
# instead of the whole window; later windows tokenize while the device works on the previous one.
DEFAULT_WINDOW_ITEMS = 8192
DEFAULT_FIRST_WINDOW_ITEMS = 1024


class EncoderError(RuntimeError):
    """An encoder cannot run: the message names the model and the problem."""


# ---------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenWindow:
    """Token ids of a window of inputs, stored flat: row i is ids[offsets[i]:offsets[i+1]]."""

    start: int                    # index of the window's first row in the caller's input
    ids: np.ndarray               # int32 [total_tokens]
    offsets: np.ndarray           # int64 [rows + 1]
    type_ids: np.ndarray | None   # int32 [total_tokens], only for models with token types (pairs)
    seconds: float = 0.0

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
        if core is not None and os.environ.get("RAG_CLEAN_RUST_TOKENIZER", "1") != "0":
            from tokenizers import Tokenizer as RustTokenizer

            self.rust = RustTokenizer.from_str(core.to_str())
            self.rust.no_padding()
            self.rust.enable_truncation(self.max_length, strategy="longest_first")

    def _encode_chunk(self, texts: list[str], pairs: list[str] | None):
        if self.lowercase:
            texts = [t.lower() for t in texts]
            pairs = None if pairs is None else [p.lower() for p in pairs]
        if self.rust is not None:
            inputs = texts if pairs is None else list(zip(texts, pairs))
            encode = getattr(self.rust, "encode_batch_fast", self.rust.encode_batch)
            encs = encode(inputs, add_special_tokens=True)
            ids = [np.asarray(e.ids, dtype=np.int32) for e in encs]
            types = [np.asarray(e.type_ids, dtype=np.int32) for e in encs] if self.with_type_ids else None
            return ids, types
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
        return ids, types

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None, start: int = 0) -> TokenWindow:
        t0 = time.perf_counter()
        texts = list(texts)
        pairs = None if pairs is None else list(pairs)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise EncoderError(f"input row {start + i} is {type(t).__name__}, expected str")
        for i, t in enumerate(pairs or ()):
            if not isinstance(t, str):
                raise EncoderError(f"input row {start + i}: passage is {type(t).__name__}, expected str")
        n = len(texts)
        if self.rust is not None:
            # One call: the Rust core spreads it over all cores without the GIL. (Several calls in
            # flight from threads measured no faster on a 16-core H100 host.)
            chunks = [(texts, pairs)]
        else:
            step = max(256, -(-n // self.threads))
            chunks = [(texts[i:i + step], None if pairs is None else pairs[i:i + step]) for i in range(0, n, step)]
        if len(chunks) <= 1:
            results = [self._encode_chunk(*c) for c in chunks]
        else:
            with ThreadPoolExecutor(len(chunks)) as pool:
                results = list(pool.map(lambda c: self._encode_chunk(*c), chunks))
        id_rows = [r for ids, _ in results for r in ids]
        lengths = np.fromiter((len(r) for r in id_rows), dtype=np.int64, count=len(id_rows))
        offsets = np.zeros(len(id_rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.concatenate(id_rows) if id_rows else np.zeros(0, dtype=np.int32)
        types = None
        if self.with_type_ids:
            types = np.concatenate([r for _, ty in results for r in ty]) if id_rows else np.zeros(0, dtype=np.int32)
        return TokenWindow(start=start, ids=ids, offsets=offsets, type_ids=types, seconds=time.perf_counter() - t0)


def window_bounds(n: int, window: int, first_window: int | None = None) -> list[tuple[int, int]]:
    """(start, end) of each window: a first window of `first_window` rows, then `window` rows each."""
    first = min(window, first_window or window)
    bounds, start = [], 0
    while start < n:
        end = min(n, start + (first if start == 0 else window))
        bounds.append((start, end))
        start = end
    return bounds


def tokenize_windows(tokenizer: Tokenizer, texts: Sequence[str], pairs: Sequence[str] | None = None,
                     window: int = DEFAULT_WINDOW_ITEMS, first_window: int | None = None) -> Iterator[TokenWindow]:
    """Yield TokenWindows of `window` rows (the first of `first_window`); the next one tokenizes
    on a background thread while the caller works on the current one."""
    n = len(texts)
    if n == 0:
        return
    bounds = window_bounds(n, window, first_window)
    results: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce():
        try:
            for s, e in bounds:
                if stop.is_set():
                    return
                w = tokenizer.encode(texts[s:e], None if pairs is None else pairs[s:e], start=s)
                results.put(("ok", w))
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


# ---------------------------------------------------------------------------------------------
# Batches under a token budget
# ---------------------------------------------------------------------------------------------


def plan_batch(sorted_lengths: np.ndarray, start: int, budget: int) -> int:
    """End (exclusive) of the longest run from `start` whose padded size fits `budget`.

    Rows are sorted by length descending, so the first row of a batch is its padded width:
    padded tokens = rows x sorted_lengths[start]. At least one row, whatever the budget.
    """
    width = max(int(sorted_lengths[start]), 1)
    rows = max(1, budget // width)
    return min(len(sorted_lengths), start + rows)


def plan_batches(lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """All batches (row index arrays, longest first) for a fixed budget."""
    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    out, i = [], 0
    while i < len(order):
        j = plan_batch(sorted_lengths, i, budget)
        out.append(order[i:j])
        i = j
    return out


class BatchSource:
    """Thread-safe cursor over a window's rows sorted by length (longest first).

    `take(budget)` returns the next batch that fits `budget`; items given back through
    `give_back` (after an OOM) are re-split and served first.
    """

    def __init__(self, lengths: np.ndarray):
        self.order = np.argsort(-lengths, kind="stable")
        self.sorted_lengths = lengths[self.order]
        self.cursor = 0
        self.retry: list[np.ndarray] = []
        self.lock = threading.Lock()
        self._lengths = lengths

    def take(self, budget: int) -> np.ndarray | None:
        with self.lock:
            if self.retry:
                rows = self.retry.pop()
                lens = self._lengths[rows]
                end = plan_batch(lens, 0, budget)
                if end < len(rows):
                    self.retry.append(rows[end:])
                return rows[:end]
            if self.cursor >= len(self.order):
                return None
            end = plan_batch(self.sorted_lengths, self.cursor, budget)
            rows = self.order[self.cursor:end]
            self.cursor = end
            return rows

    def give_back(self, rows: np.ndarray) -> None:
        with self.lock:
            self.retry.append(rows)


# ---------------------------------------------------------------------------------------------
# Budget: remembered, sized, halved on OOM
# ---------------------------------------------------------------------------------------------


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


class BudgetStore:
    """Remembers the last safe token budget per (model, device name) in a small JSON file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @staticmethod
    def key(model: str, device: str) -> str:
        return f"{model}|{device}"

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EncoderError(f"token budget store {self.path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise EncoderError(f"token budget store {self.path}: expected a JSON object, got {type(data).__name__}")
        return data

    def get(self, model: str, device: str) -> int | None:
        entry = self._read().get(self.key(model, device))
        return int(entry["token_budget"]) if entry else None

    def put(self, model: str, device: str, token_budget: int) -> None:
        data = self._read()
        data[self.key(model, device)] = {"token_budget": int(token_budget), "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def size_budget_to_memory(device: torch.device, bytes_per_token: int, cap: int = DEFAULT_CUDA_TOKEN_BUDGET_CAP,
                          fraction: float = 0.5) -> int:
    """Tokens whose activations fit in `fraction` of the device's free memory, at most `cap`."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(max(1024, min(cap, free * fraction // max(bytes_per_token, 1))))


class BudgetController:
    """Current token budget for one model on one device; halves on OOM down to `floor`."""

    def __init__(self, model: str, device: torch.device, *, start: int, floor: int, store: BudgetStore | None,
                 stats=None):
        self.model = model
        self.device = device
        self.device_label = device_name(device)
        self.budget = int(start)
        self.floor = int(floor)
        self.store = store
        self.stats = stats
        self.lock = threading.Lock()
        if stats is not None:
            stats.token_budget_start = self.budget
            stats.token_budget_final = self.budget

    @classmethod
    def create(cls, model: str, device: torch.device, *, token_budget: int | None, store: BudgetStore | None,
               floor: int, bytes_per_token: int, stats=None) -> "BudgetController":
        start = token_budget
        if start is None and store is not None:
            start = store.get(model, device_name(device))
        if start is None:
            start = size_budget_to_memory(device, bytes_per_token) if device.type == "cuda" else DEFAULT_CPU_TOKEN_BUDGET
        return cls(model, device, start=max(int(start), floor), floor=floor, store=store, stats=stats)

    def on_oom(self, batch_index: int, rows: int, tokens: int) -> int:
        """Halve the budget after an OOM on a batch of `tokens` padded tokens; raise below the floor."""
        with self.lock:
            old = self.budget
            # Halve from what actually failed: a batch smaller than the budget still OOMed.
            new = min(old, tokens) // 2
            # One row cannot be split further; below the floor the model does not fit at all.
            if rows <= 1 or new < self.floor:
                raise EncoderError(
                    f"model {self.model}: out of device memory on {self.device_label} with a batch of {rows} rows / "
                    f"{tokens} padded tokens; token budget {old} cannot be halved below the floor {self.floor}"
                )
            self.budget = new
            if self.stats is not None:
                self.stats.oom_mitigations.append({
                    "event": "oom_backoff", "batch_index": batch_index, "old_budget": old, "new_budget": new,
                    "device": str(self.device), "rows": rows, "padded_tokens": tokens,
                })
                self.stats.token_budget_final = new
            return new

    def remember(self) -> None:
        if self.store is not None:
            self.store.put(self.model, self.device_label, self.budget)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError)


def iter_batches(source: BatchSource, controller: BudgetController, launch: Callable[[np.ndarray], object],
                 next_batch_index: Callable[[], int]) -> Iterator[tuple[np.ndarray, object]]:
    """Pull batches from `source` and launch them; on OOM halve the budget and retry the same rows.

    Yields (rows, launch result). Batches yielded earlier are finished and never re-run.
    """
    while True:
        rows = source.take(controller.budget)
        if rows is None:
            return
        try:
            result = launch(rows)
        except Exception as exc:
            if not is_oom(exc):
                raise
            padded = int(source._lengths[rows].max()) * len(rows)
            del exc  # drop the traceback's references to the failed batch's tensors before freeing
            if controller.device.type == "cuda":
                torch.cuda.empty_cache()
            controller.on_oom(next_batch_index(), len(rows), padded)
            source.give_back(rows)
            continue
        yield rows, result
