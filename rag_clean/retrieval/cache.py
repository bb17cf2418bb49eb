"""Side-file caches of the reranked stage: nothing on the query side is encoded twice.

Retrieval over the whole collection reruns each time (it is cheap: blockwise matrix products), but the
encodings behind it are kept, keyed by content:

| kind            | key                                            | value                      |
|-----------------|------------------------------------------------|----------------------------|
| query_vectors   | keyed hash of the query text                   | the dense model's vector   |
| masked_gold     | keyed hash of the heading-masked chunk text    | the dense model's vector   |
| sparse_queries  | keyed hash of the query text                   | term ids, weights          |
| sparse_masked   | keyed hash of the heading-masked chunk text    | term ids, weights          |
| rerank_pairs    | keyed query hash "|" passage hash              | cross-encoder score        |

One Parquet file per kind, model and collection (paths: `StorageLayout.retrieval_cache_file`), valid for one
fingerprint (schema metadata; `fingerprint()` below): another model, max length, instruction, device kind or
encode version and the file is ignored. Keys are the HMAC hashes the queries asset already stores
(rag_clean/telemetry/privacy.py), never text. A cache is rewritten atomically with the rows this run used, so removed
queries and chunks drop out. An unreadable cache is ignored (it is only a cache) and the stage says so.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa

from rag_clean.telemetry.records import ReuseCount
from rag_clean.config.registry import ModelSpec
from rag_clean.storage.parquet import write_table
from rag_clean.storage.previous import read_previous

# Bump when how a cached value is computed changes (e.g. the one-text-per-forward rule below).
CACHE_VERSION = "retrieval-cache/1"
FINGERPRINT_KEY = b"rag_clean.fingerprint"
EXTRA_KEY = b"rag_clean.extra"          # JSON: what else the values depend on (e.g. the reranker that resolved)

_VALUE_FIELDS = {
    "vector": [("vector", pa.list_(pa.float32()))],
    "sparse": [("term_ids", pa.list_(pa.int32())), ("weights", pa.list_(pa.float32()))],
    "score": [("score", pa.float32())],
}


def device_kind(device: str | list[str]) -> str:
    """"cuda" or "cpu": a GPU and the CPU give different last bits, so their values are not interchangeable."""
    first = device[0] if isinstance(device, (list, tuple)) else str(device).split(",")[0]
    return "cuda" if str(first).startswith("cuda") else str(first).split(":")[0]


def fingerprint(model_fingerprint: str, device: str | list[str], **extra) -> str:
    return json.dumps({"model": model_fingerprint, "device": device_kind(device), "version": CACHE_VERSION, **extra},
                      sort_keys=True)


@contextlib.contextmanager
def one_text_per_forward(encoder, device: str | list[str] = "cpu"):
    """Pin each cached value to its own input: a text encoded alone gives the same bits whatever else this run
    encodes (in a shared batch the GEMM shapes and the attention padding, and so the last bits, depend on the
    neighbours). On the CPU the forwards run on one thread meanwhile: a one-text forward gains nothing from
    more, and on a busy machine the thread hand-offs cost 10x (100 queries, MiniLM, loaded 2-core box: 62 s on
    2 threads, 6.6 s on 1; batched 3.7 s)."""
    runner = getattr(encoder, "runner", None)
    previous_items = getattr(runner, "max_batch_items", None)
    if runner is not None:
        runner.max_batch_items = 1
    threads = None
    if device_kind(device) == "cpu":
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    try:
        yield encoder
    finally:
        if runner is not None:
            runner.max_batch_items = previous_items
        if threads is not None:
            import torch

            torch.set_num_threads(threads)


@dataclass
class KeyedCache:
    """key -> value for one kind and model; `get`/`put` mark what this run used, `save` keeps only that."""

    path: Path | None
    value: str                          # "vector" | "sparse" | "score"
    fingerprint: str
    rows: dict[str, object] = field(default_factory=dict)
    used: dict[str, object] = field(default_factory=dict)
    reused: int = 0
    computed: int = 0
    note: str | None = None             # why the stored file was not used
    extra: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path | None, value: str, fingerprint: str) -> "KeyedCache":
        cache = cls(path, value, fingerprint)
        prior = read_previous(path, {FINGERPRINT_KEY.decode(): fingerprint})
        if prior.why == "unreadable":
            exc = prior.error
            cache.note = f"{path}: unreadable cache ignored ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
            return cache
        if prior.why == "absent":
            return cache
        if not prior.matched:
            cache.note = f"{Path(path).name}: computed with another model configuration; recomputed"
            return cache
        table = prior.opened
        cache.extra = json.loads(prior.metadata.get(EXTRA_KEY.decode(), "{}"))
        keys = table.column("key").to_pylist()
        if value == "score":
            cache.rows = dict(zip(keys, table.column("score").to_numpy().astype(np.float32)))
        elif value == "vector":
            cache.rows = dict(zip(keys, _list_rows(table.column("vector"), np.float32)))
        else:
            cache.rows = dict(zip(keys, zip(_list_rows(table.column("term_ids"), np.int32),
                                            _list_rows(table.column("weights"), np.float32))))
        return cache

    def __contains__(self, key: str) -> bool:
        return key in self.rows or key in self.used

    def missing(self, keys: Iterable[str]) -> list[str]:
        """Keys not cached, each once, in first-seen order."""
        return list(dict.fromkeys(k for k in keys if k not in self))

    def put(self, key: str, value) -> None:
        if key not in self.used:
            self.used[key] = value
            self.computed += 1

    def get(self, key: str):
        if key in self.used:
            return self.used[key]
        value = self.rows[key]
        self.used[key] = value
        self.reused += 1
        return value

    def discard_stored(self, note: str) -> None:
        self.rows, self.note = {}, note

    def count(self, unit: str) -> ReuseCount:
        return ReuseCount(reused=self.reused, computed=self.computed, unit=unit)

    def save(self) -> None:
        """Atomically rewrite the file with the rows this run used (sorted by key: same rows, same bytes)."""
        if self.path is None or not self.used:  # nothing used (e.g. the model did not load): keep the file
            return
        keys = sorted(self.used)
        columns: dict[str, list] = {"key": keys}
        if self.value == "score":
            columns["score"] = [float(self.used[k]) for k in keys]
        elif self.value == "vector":
            columns["vector"] = [np.asarray(self.used[k], np.float32) for k in keys]
        else:
            columns["term_ids"] = [np.asarray(self.used[k][0], np.int32) for k in keys]
            columns["weights"] = [np.asarray(self.used[k][1], np.float32) for k in keys]
        schema = pa.schema([("key", pa.string()), *_VALUE_FIELDS[self.value]],
                           metadata={FINGERPRINT_KEY: self.fingerprint.encode(),
                                     EXTRA_KEY: json.dumps(self.extra, sort_keys=True).encode()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_table(pa.table(columns, schema=schema), self.path)


def _list_rows(column: pa.ChunkedArray, dtype) -> list[np.ndarray]:
    out = []
    for chunk in column.chunks:
        offsets = chunk.offsets.to_numpy()
        values = chunk.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
        out += [values[offsets[i]:offsets[i + 1]].copy() for i in range(len(chunk))]
    return out


class RetrievalCaches:
    """Opens the caches of one collection; `path_of(kind, model_asset_name)` comes from StorageLayout."""

    def __init__(self, path_of: Callable[[str, str], Path] | None):
        self.path_of = path_of
        self.opened: list[KeyedCache] = []

    def open(self, kind: str, spec: ModelSpec, value: str, fp: str) -> KeyedCache:
        cache = KeyedCache.open(self.path_of(kind, spec.asset_name) if self.path_of else None, value, fp)
        self.opened.append(cache)
        return cache

    def notes(self) -> list[str]:
        return [c.note for c in self.opened if c.note and "unreadable" in c.note]

    def save_all(self) -> None:
        for cache in self.opened:
            cache.save()
