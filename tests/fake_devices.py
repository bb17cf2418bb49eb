"""Simulated CUDA devices for tests on machines without a GPU: real lock files, no device work."""

from __future__ import annotations

from rag_clean.gpu.devices import VramSnapshot


class FakeDeviceBackend:
    """A `DeviceBackend` with `n_devices` simulated devices of `total_mib` each.

    Picklable, so tests can hand it to subprocesses. Calls are recorded in `calls` (per process).
    """

    def __init__(self, n_devices: int = 2, total_mib: float = 1000.0, key_prefix: str = "fake-gpu") -> None:
        self.n_devices = n_devices
        self.total = total_mib
        self.key_prefix = key_prefix
        self.calls: list[tuple] = []
        self.allocated_mib: dict[int, float] = {}  # tests set this to simulate usage
        self.peak_mib: dict[int, float] = {}

    def unavailable_reason(self) -> str | None:
        return None if self.n_devices > 0 else "no CUDA device: fake backend has 0 devices"

    def device_count(self) -> int:
        return self.n_devices

    def lock_key(self, index: int) -> str:
        return f"{self.key_prefix}-{index}"

    def total_mib(self, index: int) -> float | None:
        return self.total

    def set_memory_fraction(self, index: int, fraction: float) -> None:
        self.calls.append(("set_memory_fraction", index, fraction))

    def reset_peak(self, index: int) -> None:
        self.calls.append(("reset_peak", index))
        self.peak_mib[index] = self.allocated_mib.get(index, 0.0)

    def peak_allocated_mib(self, index: int) -> float | None:
        return self.peak_mib.get(index, 0.0)

    def allocate(self, index: int, mib: float) -> None:
        self.allocated_mib[index] = self.allocated_mib.get(index, 0.0) + mib
        self.peak_mib[index] = max(self.peak_mib.get(index, 0.0), self.allocated_mib[index])

    def settle(self, index: int) -> None:
        self.calls.append(("settle", index))

    def snapshot(self, index: int) -> VramSnapshot:
        used = self.allocated_mib.get(index, 0.0)
        return VramSnapshot(f"cuda:{index}", used, self.total, used, used, "fake")
