"""Token budget: remembered per model and device, sized to free device memory, halved on OOM.

`BudgetController` starts from a budget (given, remembered in a `BudgetStore`, sized to free
device memory, or a CPU default), halves it on CUDA OOM (the runner retries the same rows) and
remembers the last safe one.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from filelock import FileLock

from rag_clean.encoders.base import EncoderError
from rag_clean.storage.atomic import atomic_path
from rag_clean.storage.caches import read_json_cache


def device_name(device) -> str:
    # torch loads only when a controller is made: every Dagster step process imports the assets, and
    # most steps (checks, queries, fusion, exports) never encode, so they should not pay for torch.
    from rag_clean.encoders.device import device_name as name

    return name(device)

DEFAULT_CPU_TOKEN_BUDGET = 8192
DEFAULT_CUDA_TOKEN_BUDGET_CAP = 131072
# Smallest budget worth running: below it the model does not fit at all.
MIN_TOKEN_BUDGET = 64

def _budget_entries(data) -> dict:
    """{"<model>|<device>": {"token_budget": int > 0, ...}} or TypeError / ValueError."""
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object, got {type(data).__name__}")
    for key, entry in data.items():
        budget = entry["token_budget"] if isinstance(entry, dict) else None
        if type(budget) is not int or budget <= 0:
            raise ValueError(f"entry {key!r} has no positive integer token_budget")
    return data


class BudgetStore:
    """Remembers the last safe token budget per (model, device name) in a small JSON file.

    Updates are read-modify-write under a file lock beside the store, so concurrent runs
    (several assets on one host) never drop each other's entries; each write is atomic. The file is a
    cache: unreadable or of the wrong shape it is discarded with one warning, never an error.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    @staticmethod
    def key(model: str, device: str) -> str:
        return f"{model}|{device}"

    def _read(self) -> dict:
        """The stored entries; a corrupt store is a cache (storage.caches): discarded with one warning."""
        return read_json_cache(self.path, _budget_entries) or {}

    def get(self, model: str, device: str) -> int | None:
        entry = self._read().get(self.key(model, device))
        return int(entry["token_budget"]) if entry else None

    def put(self, model: str, device: str, token_budget: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(self.lock_path):
            data = self._read()
            data[self.key(model, device)] = {"token_budget": int(token_budget),
                                             "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")


def size_budget_to_memory(device: torch.device, bytes_per_token: int, cap: int = DEFAULT_CUDA_TOKEN_BUDGET_CAP,
                          fraction: float = 0.5) -> int:
    """Tokens whose activations fit in `fraction` of the device's free memory, at most `cap`."""
    import torch

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
        """Given budget, else the remembered one, else sized to free CUDA memory, else the CPU default."""
        start = token_budget
        if start is None and store is not None:
            start = store.get(model, device_name(device))
        if start is None:
            start = size_budget_to_memory(device, bytes_per_token) if device.type == "cuda" else DEFAULT_CPU_TOKEN_BUDGET
        return cls(model, device, start=max(int(start), floor), floor=floor, store=store, stats=stats)

    def on_oom(self, batch_index: int, rows: int, tokens: int) -> int:
        """Halve the budget after an OOM on a batch that counted `tokens` against it; raise below the floor."""
        with self.lock:
            old = self.budget
            # Halve from what actually failed: a batch smaller than the budget still OOMed.
            new = min(old, tokens) // 2
            # One row cannot be split further; below the floor the model does not fit at all.
            if rows <= 1 or new < self.floor:
                raise EncoderError(
                    f"model {self.model}: out of device memory on {self.device_label} with a batch of {rows} rows / "
                    f"{tokens} tokens; token budget {old} cannot be halved below the floor {self.floor}"
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

