"""The device side of a lease: every torch.cuda / NVML call goes through a `DeviceBackend`.

`TorchCudaBackend` is the real one; tests pass a fake (tests/fake_devices.py) so the locking and
lease code runs unchanged on machines without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

_MIB = 1024.0 * 1024.0


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class VramSnapshot:
    device: str
    used_mib: float | None          # whole device, all processes (NVML) or free/total from the driver (torch)
    total_mib: float | None
    torch_allocated_mib: float | None  # this process's live tensors
    torch_reserved_mib: float | None   # this process's caching-allocator pool
    source: str  # "nvml" | "torch" | "unavailable" | "fake"
    ts: str = field(default_factory=now_iso)


def nvml_visible_count(environ=None) -> int:
    """CUDA devices this process can see, counted through NVML without importing torch: the driver's count,
    capped by CUDA_VISIBLE_DEVICES ("" or "-1": none); 0 without a driver or nvidia-ml-py."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and (not visible.strip() or visible.strip() == "-1"):
        return 0
    try:
        import pynvml  # provided by nvidia-ml-py

        pynvml.nvmlInit()
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver / no library: a CPU machine
        return 0
    if visible is not None:
        count = min(count, len([v for v in visible.split(",") if v.strip()]))
    return count


class DeviceBackend(Protocol):
    """The torch / NVML calls the lease makes, so tests can fake devices."""

    def unavailable_reason(self) -> str | None:
        """None when CUDA devices can be leased, else why not."""

    def device_count(self) -> int: ...

    def lock_key(self, index: int) -> str:
        """Identity of the physical device behind torch index `index` (shared by all processes)."""

    def total_mib(self, index: int) -> float | None: ...

    def set_memory_fraction(self, index: int, fraction: float) -> None: ...

    def reset_peak(self, index: int) -> None: ...

    def peak_allocated_mib(self, index: int) -> float | None: ...

    def settle(self, index: int) -> None:
        """Wait for queued kernels and return cached blocks to the driver."""

    def snapshot(self, index: int) -> VramSnapshot: ...


class TorchCudaBackend:
    """Real devices through torch.cuda, with NVML (nvidia-ml-py) for device-wide memory when present."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._nvml_error: str | None = None
        self._nvml_tried = False

    @staticmethod
    def _torch():
        import torch  # lazy: importing this module must stay cheap (lock-only users, subprocesses)

        return torch

    def unavailable_reason(self) -> str | None:
        try:
            torch = self._torch()
        except ImportError as exc:
            return f"no CUDA device: torch is not importable ({exc})"
        if torch.version.cuda is None:
            return f"no CUDA device: torch {torch.__version__} is a CPU-only build"
        if not torch.cuda.is_available():
            return f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {torch.version.cuda})"
        if torch.cuda.device_count() == 0:
            return "no CUDA device: torch.cuda.device_count() is 0"
        return None

    def device_count(self) -> int:
        return self._torch().cuda.device_count()

    def _uuid(self, index: int) -> str | None:
        try:
            raw = str(self._torch().cuda.get_device_properties(index).uuid)
        except (AttributeError, RuntimeError):
            return None
        return raw if raw.startswith(("GPU-", "MIG-")) else f"GPU-{raw}"

    def lock_key(self, index: int) -> str:
        device_uuid = self._uuid(index)
        if device_uuid:
            return device_uuid
        # Without a UUID, fall back to the physical index so differently-masked processes still agree.
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        return f"cuda-physical-{visible[index] if index < len(visible) else index}"

    def total_mib(self, index: int) -> float | None:
        return self._torch().cuda.get_device_properties(index).total_memory / _MIB

    def set_memory_fraction(self, index: int, fraction: float) -> None:
        self._torch().cuda.set_per_process_memory_fraction(fraction, index)

    def reset_peak(self, index: int) -> None:
        self._torch().cuda.reset_peak_memory_stats(index)

    def peak_allocated_mib(self, index: int) -> float | None:
        return self._torch().cuda.max_memory_allocated(index) / _MIB

    def settle(self, index: int) -> None:
        torch = self._torch()
        torch.cuda.synchronize(index)
        with torch.cuda.device(index):
            torch.cuda.empty_cache()

    def _nvml_module(self):
        if not self._nvml_tried:
            self._nvml_tried = True
            try:
                import pynvml  # provided by nvidia-ml-py

                pynvml.nvmlInit()  # raises NVMLError_LibraryNotFound on machines without the driver
                self._nvml = pynvml
            except ImportError as exc:
                self._nvml_error = f"nvidia-ml-py not installed ({exc})"
            except Exception as exc:  # pynvml.NVMLError and its many subclasses
                self._nvml_error = f"nvmlInit failed: {exc}"
        return self._nvml

    def _nvml_handle(self, pynvml, index: int):
        device_uuid = self._uuid(index)
        if device_uuid:
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(device_uuid)
            except Exception:
                pass
        if not os.environ.get("CUDA_VISIBLE_DEVICES"):
            return pynvml.nvmlDeviceGetHandleByIndex(index)  # torch and NVML indices agree only unmasked
        return None

    def snapshot(self, index: int) -> VramSnapshot:
        torch = self._torch()
        device = f"cuda:{index}"
        allocated = torch.cuda.memory_allocated(index) / _MIB
        reserved = torch.cuda.memory_reserved(index) / _MIB
        pynvml = self._nvml_module()
        if pynvml is not None:
            try:
                handle = self._nvml_handle(pynvml, index)
                if handle is not None:
                    info = pynvml.nvmlDeviceGetMemoryInfo(handle)
                    return VramSnapshot(device, info.used / _MIB, info.total / _MIB, allocated, reserved, "nvml")
            except Exception:
                pass  # NVML can refuse (MIG, permissions): the driver's free/total still measures the device
        try:
            free, total = torch.cuda.mem_get_info(index)
            return VramSnapshot(device, (total - free) / _MIB, total / _MIB, allocated, reserved, "torch")
        except RuntimeError:
            return VramSnapshot(device, None, None, allocated, reserved, "unavailable")
