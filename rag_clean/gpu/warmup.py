"""Warm the encoder stack on a background thread while the run's CPU steps (chunks) work.

Why: the first GPU step of a process paid ~7-9 s before its first batch on the H100 host (torch and
transformers imports, CUDA init, the CUDA context, cuBLAS's library load on the first matmul), all
after `chunks`, which leaves the GPU idle and most host cores free. Started when the GPU lease resource is
set up (once per run under the in-process executor), the thread does that work during `chunks`; the
first leased stage waits for it (`wait()`) before importing anything itself, so the two threads never
import side by side. Setting `warmup` (RAG_CLEAN_WARMUP=0 turns it off).

The CUDA context is made only when exactly one device can be leased: on a shared multi-GPU host a
context on every card would cost each of them memory for a step that leases one.
Failures are not errors here: the stage that needs the piece does it again and reports it then.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from dataclasses import dataclass, field

from rag_clean.gpu.devices import nvml_visible_count

log = logging.getLogger(__name__)

# What the engine's first encoding step imports (light loading: transformers' Auto classes, no
# sentence-transformers), so the step finds them in sys.modules.
MODULES = (
    "torch",
    "transformers",
    "rag_clean.encoders.factory",
    "rag_clean.encoders.model_load",
    "rag_clean.encoders.fast_bert",
    "rag_clean.encoders.runner",
    "rag_clean.encoders.st_dense",
    "rag_clean.encoders.st_sparse",
    "rag_clean.encoders.st_rerank",
    "rag_clean.encoders.token_cache",
)
# Attributes of transformers' lazy module that the light loader resolves (each imports a submodule).
TRANSFORMERS_NAMES = ("AutoConfig", "AutoTokenizer", "AutoModel", "BertModel")


@dataclass
class Warmup:
    """One background warm-up and what it did (`done` is set when the thread ends, whatever happened)."""

    cuda_device: int | None
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    steps: dict[str, float] = field(default_factory=dict)
    problem: str | None = None
    reported: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            for name in MODULES:
                self._timed(name, importlib.import_module, name)
            transformers = importlib.import_module("transformers")
            for name in TRANSFORMERS_NAMES:
                self._timed(f"transformers.{name}", getattr, transformers, name)
            if self.cuda_device is not None and not self._timed("cuda", _warm_cuda, self.cuda_device):
                self.cuda_device = None  # NVML saw a card torch cannot use (a CPU-only build): no context made
        except Exception as exc:  # noqa: BLE001 - the stage that needs the piece reports it
            self.problem = f"{type(exc).__name__}: {exc}"
            log.debug("warm-up stopped: %s", self.problem)
        finally:
            self.seconds = time.monotonic() - self.started
            self.done.set()

    def _timed(self, label: str, fn, *args):
        t0 = time.monotonic()
        result = fn(*args)
        self.steps[label] = round(time.monotonic() - t0, 3)
        return result

    def describe(self) -> str:
        where = f"cuda:{self.cuda_device}" if self.cuda_device is not None else "no CUDA context"
        took = f"{self.seconds:.1f}s" if self.seconds is not None else "still running"
        parts = sorted(self.steps.items(), key=lambda kv: -kv[1])[:3]  # where the time went, largest first
        detail = f" ({', '.join(f'{name} {sec:.1f}s' for name, sec in parts)})" if parts else ""
        return f"warm-up ({where}) {took}{detail}" + (f", stopped: {self.problem}" if self.problem else "")


def _warm_cuda(index: int) -> bool:
    """Context, allocator and cuBLAS / SDPA kernels on device `index`: what the first batch would pay.
    False when torch cannot use that device."""
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return False
    device = torch.device("cuda", index)
    with torch.cuda.device(device):
        x = torch.randn(4, 128, 64, device=device, dtype=torch.bfloat16)
        (x @ x.transpose(-1, -2)).sum().item()
        F.scaled_dot_product_attention(x[None], x[None], x[None]).sum().item()
        torch.nn.functional.linear(x, torch.randn(64, 64, device=device, dtype=torch.bfloat16)).sum().item()
        torch.cuda.synchronize(device)
    return True


_lock = threading.Lock()
_current: Warmup | None = None


def start(cuda_device: int | None) -> Warmup:
    """Start the process's warm-up (once: later calls return the first one)."""
    global _current
    with _lock:
        if _current is None:
            _current = Warmup(cuda_device)
            threading.Thread(target=_current.run, name="rag_clean-warmup", daemon=True).start()
        return _current


@dataclass(frozen=True)
class WarmupNote:
    """The run-log line of a finished warm-up; `cuda`: it made a context (worth INFO; CPU runs say it at DEBUG)."""

    text: str
    cuda: bool


def wait(timeout_s: float = 120.0) -> WarmupNote | None:
    """Block until this process's warm-up (if any) has ended. Returns its note the first time (what it warmed,
    how long, how long this waited), else None."""
    current = _current
    if current is None:
        return None
    t0 = time.monotonic()
    if not current.done.wait(timeout_s):
        return WarmupNote(f"warm-up still running after {timeout_s:.0f}s; the step goes on without it", True)
    waited = time.monotonic() - t0
    with _lock:
        if current.reported:
            return None
        current.reported = True
    return WarmupNote(f"{current.describe()}; this step waited {waited:.1f}s for it", current.cuda_device is not None)


def single_cuda_device(devices: list[int] | None) -> int | None:
    """The device to make a context on: the only one the lease may grant, else None (no context).

    Counted through NVML (gpu.devices.nvml_visible_count), so a CPU-only or multi-GPU machine never imports
    torch for this.
    """
    if devices is not None:
        return devices[0] if len(devices) == 1 else None
    return 0 if nvml_visible_count() == 1 else None
