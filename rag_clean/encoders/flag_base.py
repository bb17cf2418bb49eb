"""Loading shared by the FlagEmbedding backends (registry entries with `backend = "flagembedding"`).

FlagEmbedding loads the weights and supplies pooling and the M3 heads; batches run through
`rag_clean.encoders.runner` like every other backend. FlagEmbedding's own encode() /
compute_score() are not used: they tokenize and hold the whole input, return only at the end,
size batches by count, and probe the first batch (swallowing any RuntimeError as "too big").
FlagEmbedding is imported lazily, so these modules import on machines that lack it.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, Sequence

import torch

from rag_clean.encoders.base import EncodeStats, EncoderError
from rag_clean.encoders.budget import BudgetStore
from rag_clean.encoders.device import bytes_per_token, check_max_length, dtype_name, parse_devices, place, resolve_dtype
from rag_clean.encoders.runner import Replica, Runner, RunnerEncoder
from rag_clean.config.registry import ModelSpec

BACKEND = "flagembedding"


def load_first(spec: ModelSpec, load: Callable[[str], object]) -> tuple[object, str, dict | None]:
    """Load the primary source, else each fallback in order; error lists why every one failed."""
    failures = []
    for i, source in enumerate(spec.candidate_sources()):
        try:
            obj = load(spec.resolve_source(source))
        except Exception as exc:  # any loader failure moves on to the next fallback
            failures.append(f"{source}: {type(exc).__name__}: {exc}")
            continue
        fallback = None
        if i > 0:
            fallback = {"applied": True, "reason": "; ".join(failures), "source": source}
        return obj, source, fallback
    raise EncoderError(f"model {spec.name}: no source could be loaded ({' | '.join(failures)})")


def check_dim(spec: ModelSpec, produced: int, source: str) -> int:
    if spec.dim is not None and spec.dim != produced:
        raise EncoderError(
            f"model {spec.name} ({source}): produces {produced}-d vectors but the registry says dim = {spec.dim}"
        )
    return produced


class FlagBackend(RunnerEncoder):
    """A FlagEmbedding model on one device, batched by the runner (padded: FlagEmbedding's modules
    take padded batches)."""

    unpadded = varlen = False

    def __init__(self, spec: ModelSpec, device: str | Sequence[str]):
        self.spec = spec
        devices = parse_devices(device, spec.name)
        if len(devices) > 1:
            # One FlagEmbedding model per encoder: of several devices the first runs, rather than
            # failing a multi-GPU step.
            warnings.warn(f"model {spec.name}: flagembedding backend uses one device; running on {devices[0]} of "
                          f"{[str(d) for d in devices]}", stacklevel=3)
        self.device = devices[0]
        self.dtype = resolve_dtype(spec, self.device)
        self.stats = EncodeStats(model=spec.name, backend=BACKEND, device=str(self.device),
                                 dtype=dtype_name(self.dtype))
        self._t0 = time.perf_counter()

    def start_runner(self, loaded, module: torch.nn.Module, hf: torch.nn.Module, tokenizer, source: str, *,
                     token_budget: int | None, budget_store: BudgetStore | None, window_items: int) -> None:
        """Place `module` (which holds the transformer `hf`) on the device and start the runner over it."""
        check_max_length(self.spec, hf.config, source)
        place(module, self.dtype, self.device)
        self.runner = Runner(self, [Replica(self.device, loaded, hf, parts={"module": module})], tokenizer,
                             self.stats, token_budget=token_budget, budget_store=budget_store,
                             bytes_per_token=bytes_per_token(hf.config, self.dtype), window_items=window_items)
        self.stats.load_seconds = time.perf_counter() - self._t0

    @property
    def transformer(self) -> torch.nn.Module:
        return self.replicas[0].hf
