"""Where and in what precision a model runs, and how much of a model fits: one rule each, for every backend.

- `parse_devices`: "cpu" | "cuda" | "cuda:0,cuda:1" | ["cuda:0", "cuda:1"] -> torch devices.
- `resolve_dtype`: "auto" is bf16 on CUDA; CPU always runs float32 (half precision there is slow
  and some kernels lack it). `flag_precision` turns the result into FlagEmbedding's flags.
- `usable_positions` / `effective_max_length` / `check_max_length`: the model's position limit
  (RoBERTa-family position ids start after the padding index).
- `bytes_per_token`: activation footprint that sizes the first CUDA token budget.
- `to_device`: host arrays -> device tensors (pinned, asynchronous on CUDA).
"""

from __future__ import annotations

import gc
from typing import Sequence

import numpy as np
import torch

from rag_clean.encoders.base import EncoderError
from rag_clean.config.registry import ModelSpec
# Re-exported: the rule lives in limits (no torch), which the chunker reads without loading torch.
from rag_clean.encoders.limits import ROBERTA_FAMILY, effective_max_length, position_offset, usable_positions  # noqa: F401

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_devices(device: str | torch.device | Sequence[str], model: str) -> list[torch.device]:
    """Devices named by `device`, one replica each; a bare "cuda" means the current CUDA device."""
    if isinstance(device, (list, tuple)):
        names = [str(d).strip() for d in device]
    else:
        names = [d.strip() for d in str(device).split(",")]
    names = [n for n in names if n]
    if not names:
        raise EncoderError(f"model {model}: no device in {device!r}")
    devices = []
    for name in names:
        dev = torch.device(name)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise EncoderError(f"model {model}: device {name!r} requested but CUDA is not available on this machine")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
        devices.append(dev)
    return devices


def device_name(device: torch.device) -> str:
    """What a remembered token budget is keyed by: the GPU model, or "cpu"."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


def resolve_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    if device.type != "cuda" or spec.dtype == "float32":
        return torch.float32
    if spec.dtype == "auto":
        return torch.bfloat16
    return _DTYPES[spec.dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def flag_precision(dtype: torch.dtype) -> dict[str, bool]:
    """FlagEmbedding constructor flags for `dtype` (they only steer FlagEmbedding's own encode)."""
    return {"use_fp16": dtype == torch.float16, "use_bf16": dtype == torch.bfloat16}


def check_max_length(spec: ModelSpec, config, source: str) -> None:
    """Refuse a registry max_length the model cannot embed (backends that do not clamp)."""
    positions = usable_positions(config)
    if positions is not None and spec.max_length > positions:
        raise EncoderError(
            f"model {spec.name} ({source}): max_length {spec.max_length} exceeds the model's {positions} positions"
        )


def bytes_per_token(config, dtype: torch.dtype, extra_width: int = 0) -> int:
    d = int(getattr(config, "hidden_size", 1024))
    f = int(getattr(config, "intermediate_size", 4 * d))
    elem = torch.finfo(dtype).bits // 8
    # Live activations of one layer at a time (hidden, qkv, attention out, MLP intermediate) with
    # headroom for allocator fragmentation; the weights are already resident.
    return int((10 * d + 2 * f + extra_width) * elem * 2)


class PinnedStaging:
    """numpy inputs -> CUDA tensors through pinned host buffers that are reused, not pinned afresh per batch.

    `tensor.pin_memory()` per input and batch cost ~5 ms a call on an H100 host (552 calls: 2.5 s of bge-base's
    12 s encode of 100k chunks): unpadded batches differ in size, so the caching host allocator kept allocating.
    Two slots per input name, used in turn, each grown to a power of two: a slot is rewritten two batches after
    its last copy, and only once that copy's event has completed (the runner has one batch in flight behind
    the one it launches). Use one per replica thread."""

    def __init__(self, device: torch.device):
        self.device = device
        self.slots: dict[tuple[str, int], tuple[torch.Tensor, torch.cuda.Event]] = {}
        self.turn = 0

    def to_device(self, arrays: dict[str, object]) -> dict[str, object]:
        self.turn ^= 1
        return {key: self._copy(key, value) if isinstance(value, np.ndarray) else value
                for key, value in arrays.items()}

    def _copy(self, key: str, array: np.ndarray) -> torch.Tensor:
        array = np.ascontiguousarray(array)
        if not array.nbytes:
            return torch.from_numpy(array).to(self.device)
        buffer, event = self.slots.get((key, self.turn), (None, None))
        if event is not None:
            event.synchronize()
        if buffer is None or buffer.numel() < array.nbytes:
            buffer = torch.empty(1 << (array.nbytes - 1).bit_length(), dtype=torch.uint8, pin_memory=True)
        staged = buffer[:array.nbytes]
        staged.numpy()[:] = array.reshape(-1).view(np.uint8)
        tensor = staged.view(torch.from_numpy(array[:0].reshape(-1)).dtype).view(array.shape)
        out = tensor.to(self.device, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.slots[(key, self.turn)] = (buffer, done)
        return out


def to_device(arrays: dict[str, object], device: torch.device) -> dict[str, object]:
    """numpy arrays -> tensors on `device` (pinned + non_blocking on CUDA); other values pass through."""
    out = {}
    for key, value in arrays.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
            if device.type == "cuda":
                value = value.pin_memory().to(device, non_blocking=True)
        out[key] = value
    return out


def place(model: torch.nn.Module, dtype: torch.dtype, device: torch.device,
          cast: torch.nn.Module | None = None) -> torch.nn.Module:
    """Cast `cast` (default: all of `model`) on the host, then move `model`: the fp32 copy never
    occupies the device (peak VRAM at load = the half-precision weights, which matters under a
    lease's memory ceiling)."""
    (cast or model).to(dtype=dtype)
    return model.to(device).eval()


def release(devices: Sequence[torch.device]) -> None:
    gc.collect()
    if any(d.type == "cuda" for d in devices):
        torch.cuda.empty_cache()
