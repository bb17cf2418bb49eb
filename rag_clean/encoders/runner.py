"""The one batch loop every encoder backend runs through.

The runner's input is a `TokenSource` (rag_clean.encoders.tokens): windows of token ids, built one
ahead of the device, with the rows' content hashes when known (the token cache reads ids by them).
A backend loads its model once per device (a `Replica`) and implements two calls, the shape of
TEI's `embed(Batch)` and infinity's `encode_core` / `encode_post`:

- `forward(replica, batch) -> tuple[Tensor, ...]`: device outputs of one batch (inputs already on
  the device), launched without waiting for the device;
- `post(batch, outputs) -> Encoded`: host numpy outputs -> the batch's rows and heads
  (rag_clean.encoders.base.Encoded: dense / lexical / colbert / score).

and two attributes: `unpadded`, whether its forward takes unpadded batches (concatenated rows, so
no pad token goes through its dense layers), and `varlen`, whether its attention is variable-length
too. Only a varlen forward never builds a rows x longest buffer, so only then does a batch cost its
real tokens against the token budget; otherwise it costs rows x longest (FastBert on CPU pads for
attention, which also keeps CPU batches what they were). The `Runner` owns everything else: tokenize-ahead
windows, length-sorted token-budget batches, OOM backoff (halve, retry the same rows, remember
the safe budget per model and device), pinned asynchronous copy-back with one batch in flight,
a BatchRecord per batch, and one thread per replica pulling from one shared batch source.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from rag_clean.config.settings import process_setting
from rag_clean.encoders.base import BatchRecord, Encoded, EncodeStats
from rag_clean.encoders.batching import BatchSource, batch_tokens
from rag_clean.encoders.budget import MIN_TOKEN_BUDGET, BudgetController, BudgetStore
from rag_clean.encoders.device import PinnedStaging, release, to_device
from rag_clean.encoders.tokenize import DEFAULT_FIRST_WINDOW_ITEMS, DEFAULT_WINDOW_ITEMS, TokenWindow
from rag_clean.encoders.tokens import TokenSource


@dataclass
class Replica:
    """One loaded copy of a model on one device."""

    device: torch.device
    model: object                    # what the backend loaded (a SentenceTransformer, a FlagEmbedding model, ...)
    hf: torch.nn.Module              # the transformer inside it
    fast: object | None = None       # FastBert over hf's weights when the backend runs unpadded
    parts: dict = field(default_factory=dict)  # backend modules bound to this replica (heads, pooling modules)


@dataclass
class Batch:
    """Rows of one window, as host arrays and (once the runner moved them) device inputs."""

    window: TokenWindow
    rows: np.ndarray                 # row numbers within the window, longest first
    unpadded: bool
    host: dict[str, object]          # window.unpadded(rows) or window.padded(rows, pad_id)
    inputs: dict[str, object] | None = None

    @property
    def lengths(self) -> np.ndarray:
        return self.window.lengths[self.rows]

    @property
    def indices(self) -> np.ndarray:
        """Row numbers in the caller's input."""
        return self.window.start + self.rows.astype(np.int64)

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def padded_tokens(self) -> int:
        return batch_tokens(self.lengths, self.unpadded)


class Backend(Protocol):
    unpadded: bool
    varlen: bool

    def forward(self, replica: Replica, batch: Batch) -> tuple[torch.Tensor, ...]: ...

    def post(self, batch: Batch, outputs: tuple[np.ndarray, ...]) -> Encoded: ...


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
            del exc  # drop the traceback's references to the failed batch's tensors before freeing
            if controller.device.type == "cuda":
                torch.cuda.empty_cache()
            controller.on_oom(next_batch_index(), len(rows), source.tokens(rows))
            source.give_back(rows)
            continue
        yield rows, result


class Runner:
    def __init__(self, backend: Backend, replicas: list[Replica], tokenizer, stats: EncodeStats, *,
                 token_budget: int | None, budget_store: BudgetStore | None, bytes_per_token: int,
                 window_items: int = DEFAULT_WINDOW_ITEMS):
        self.backend = backend
        self.replicas = replicas
        self.tokenizer = tokenizer
        self.stats = stats
        self.window_items = window_items
        self.first_window_items = DEFAULT_FIRST_WINDOW_ITEMS
        self.max_batch_items: int | None = None  # optional item cap per batch (the reranker's rerank_batch_size)
        stats.max_length = tokenizer.max_length
        self.controllers = [
            BudgetController.create(stats.model, r.device, token_budget=token_budget, store=budget_store,
                                    floor=min(tokenizer.max_length, MIN_TOKEN_BUDGET),
                                    bytes_per_token=bytes_per_token, stats=stats if i == 0 else None)
            for i, r in enumerate(replicas)
        ]
        self._batch_counter = 0
        self._counter_lock = threading.Lock()

    def run(self, source: TokenSource) -> Iterator[Encoded]:
        """Yield backend.post(...) per batch (an Encoded), in any order, every row of `source` once."""
        t0 = time.perf_counter()
        # The tokenize-ahead thread and this (kernel-launching) thread share the GIL; at the default
        # 5 ms switch interval each wake-up after a device sync can wait that long for it.
        # RAG_CLEAN_GIL_SWITCH_MS=0 keeps the interpreter's setting.
        switch_ms = process_setting("gil_switch_ms")
        saved_switch = sys.getswitchinterval()
        if switch_ms > 0 and any(r.device.type == "cuda" for r in self.replicas):
            sys.setswitchinterval(min(saved_switch, switch_ms / 1000.0))
        try:
            for window in source.windows(self.tokenizer, self.window_items, self.first_window_items):
                self.stats.tokenize_seconds += window.seconds
                self.stats.truncated_inputs += window.truncated
                if window.cut is not None and window.truncated:
                    self.stats.truncated_rows.extend((window.start + np.flatnonzero(window.cut)).tolist())
                source = BatchSource(window.lengths, self.backend.varlen, self.max_batch_items)
                if len(self.replicas) == 1:
                    yield from self._run_on(self.replicas[0], self.controllers[0], window, source)
                else:
                    yield from self._run_replicas(window, source)
            for controller in self.controllers:
                controller.remember()
        finally:
            sys.setswitchinterval(saved_switch)
            self.stats.wall_seconds += time.perf_counter() - t0

    def score_pairs(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """float32 scores in input order, for a backend that posts one score per row."""
        out = np.full(len(pairs), np.nan, dtype=np.float32)
        if pairs:
            for batch in self.run(TokenSource([q for q, _ in pairs], pairs=[p for _, p in pairs])):
                out[batch.rows] = batch.score
        return out

    def _next_batch_index(self) -> int:
        with self._counter_lock:
            return self._batch_counter

    def _batch(self, window: TokenWindow, rows: np.ndarray) -> Batch:
        unpadded = self.backend.unpadded
        host = window.unpadded(rows) if unpadded else window.padded(rows, self.tokenizer.pad_id)
        return Batch(window, rows, unpadded, host)

    def _run_on(self, replica: Replica, controller: BudgetController, window: TokenWindow,
                source: BatchSource) -> Iterator[Encoded]:
        """Run `source`'s batches on one replica, one batch in flight behind the one being launched."""
        cuda = replica.device.type == "cuda"
        pending = None  # (batch, host outputs, copy-done event, start, end, budget)
        staging = PinnedStaging(replica.device) if cuda else None

        def launch(rows):
            batch = self._batch(window, rows)
            if not cuda:
                t0 = time.perf_counter()
                batch.inputs = to_device(batch.host, replica.device)
                outs = self.backend.forward(replica, batch)
                return batch, tuple(o.contiguous() for o in outs), None, t0, time.perf_counter()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            batch.inputs = staging.to_device(batch.host)
            outs = self.backend.forward(replica, batch)
            end.record()
            host = tuple(torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in outs)
            for h, o in zip(host, outs):
                h.copy_(o, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return batch, host, done, start, end

        def finish(p):
            batch, host, done, start, end, budget = p
            if cuda:
                done.synchronize()
                seconds = start.elapsed_time(end) / 1000.0
            else:
                seconds = end - start
            record = BatchRecord(items=len(batch.rows), tokens=batch.tokens, padded_tokens=batch.padded_tokens,
                                 seconds=seconds, token_budget=budget)
            with self._counter_lock:
                self.stats.batches.append(record)
                self._batch_counter += 1
            return self.backend.post(batch, tuple(h.numpy() for h in host))

        device_scope = torch.cuda.device(replica.device) if cuda else contextlib.nullcontext()
        with torch.inference_mode(), device_scope:
            for _rows, launched in iter_batches(source, controller, launch, self._next_batch_index):
                if pending is not None:
                    yield finish(pending)
                pending = (*launched, controller.budget)
            if pending is not None:
                yield finish(pending)

    def _run_replicas(self, window: TokenWindow, source: BatchSource):
        """One thread per replica pulls from the shared source; results come back through a queue."""
        results: queue.Queue = queue.Queue(maxsize=4 * len(self.replicas))
        stop = threading.Event()

        def work(replica, controller):
            try:
                for item in self._run_on(replica, controller, window, source):
                    if stop.is_set():
                        return
                    results.put(("ok", item))
            except BaseException as exc:
                results.put(("error", exc))
            finally:
                results.put(("done", None))

        threads = [threading.Thread(target=work, args=(r, c), daemon=True, name=f"encode-{r.device}")
                   for r, c in zip(self.replicas, self.controllers)]
        for t in threads:
            t.start()
        running = len(threads)
        try:
            while running:
                kind, value = results.get()
                if kind == "done":
                    running -= 1
                elif kind == "error":
                    raise value
                else:
                    yield value
        finally:
            stop.set()
            while any(t.is_alive() for t in threads):
                try:
                    results.get(timeout=0.05)
                except queue.Empty:
                    pass

    def close(self) -> None:
        """Drop every replica (the model and what the backend bound to it) and free device memory."""
        devices = [r.device for r in self.replicas]
        for r in self.replicas:
            r.model = r.hf = r.fast = None
            r.parts.clear()
        self.replicas.clear()
        release(devices)


class RunnerEncoder:
    """What every runner-backed encoder exposes besides its contract: encode, replicas, window size, close.
    A backend adds only load (its __init__), forward and, when its outputs are not one head, post."""

    runner: Runner
    heads: tuple[str, ...]

    def encode(self, rows: TokenSource | Sequence[str]) -> Iterator[Encoded]:
        """One Encoded per finished batch; `rows` a TokenSource or a sequence of texts."""
        yield from self.runner.run(TokenSource.of(rows))

    @property
    def replicas(self) -> list[Replica]:
        return self.runner.replicas

    @property
    def window_items(self) -> int:
        return self.runner.window_items

    @window_items.setter
    def window_items(self, value: int) -> None:
        self.runner.window_items = int(value)

    def post(self, batch: Batch, outputs: tuple[np.ndarray, ...]) -> Encoded:
        """A backend with one output per batch: that array is its one head (rows in batch order)."""
        (head,) = self.heads
        return Encoded(batch.indices, **{head: outputs[0]})

    def close(self) -> None:
        self.runner.close()
