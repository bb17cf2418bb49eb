"""GPU lease: exclusive use of N CUDA devices across processes, with a memory ceiling and VRAM snapshots.

- Exclusivity comes from one lock file per physical device (rag_clean.gpu.locks). N devices are
  taken all or nothing: one attempt tries every candidate without blocking; if it got fewer than N it
  lets go of them and polls again. There is no queue: a large request can wait behind a stream of
  small ones until `timeout_s`.
- Lock files are keyed by the device UUID when torch reports it, so processes with different
  CUDA_VISIBLE_DEVICES still contend for the same physical GPU.
- Without CUDA (or with RAG_CLEAN_FORCE_CPU=1) a lease grants "cpu", says why, and takes no lock:
  CPU work is not serialised here (the OS schedules it; Dagster pools can limit concurrency).
- Every torch / NVML call goes through a DeviceBackend (rag_clean.gpu.devices).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from rag_clean.gpu.devices import DeviceBackend, TorchCudaBackend, VramSnapshot, now_iso
from rag_clean.gpu.lease_settings import DEFAULT_TIMEOUT_S, ENV_FORCE_CPU, LEASE_SETTING_NAMES, LeaseSettings
from rag_clean.gpu.locks import DeviceLock, release_all, try_acquire_n, write_notes


@dataclass
class LeaseEvent:
    ts: str
    event: str  # requested | waiting | acquired | ceiling_applied | cpu_fallback | released | user events
    devices: list[str]
    detail: dict = field(default_factory=dict)


@dataclass
class LeaseSummary:
    """Filled when the lease ends; the telemetry layer stores `to_dict()`."""

    lease_id: str
    holder: dict  # {"pid", "host", "owner"}
    devices: list[str]
    cpu_fallback: bool
    reason: str | None
    wait_seconds: float
    held_seconds: float
    memory_ceiling_fraction: float | None
    memory_ceiling_mib: float | None
    vram_before: list[VramSnapshot]
    vram_after: list[VramSnapshot]
    vram_peak_torch_mib: dict[str, float | None]  # torch.cuda.max_memory_allocated per device, during the lease
    events: list[LeaseEvent]
    requested_at: str
    acquired_at: str
    released_at: str
    error: str | None = None  # exception type and message when the body raised

    def to_dict(self) -> dict:
        return asdict(self)


class Lease:
    """What a holder gets: devices to run on, the event log, and (after exit) the summary."""

    def __init__(self, lease_id: str, owner: str, on_event: Callable[[LeaseEvent], None] | None) -> None:
        self.lease_id = lease_id
        self.owner = owner
        self.devices: list[str] = []
        self.is_cpu = False
        self.reason: str | None = None
        self.events: list[LeaseEvent] = []
        self.summary: LeaseSummary | None = None
        self._on_event = on_event

    @property
    def device(self) -> str:
        """The first leased device ("cuda:0" or "cpu"), for single-device work."""
        return self.devices[0]

    def record(self, event: str, devices: list[str] | None = None, **detail: Any) -> LeaseEvent:
        ev = LeaseEvent(now_iso(), event, list(self.devices if devices is None else devices), detail)
        self.events.append(ev)
        if self._on_event is not None:
            self._on_event(ev)
        return ev


class GpuLeaseManager:
    def __init__(
        self,
        lock_dir: Path | str,
        *,
        devices: list[int] | None = None,
        memory_fraction: float | None = None,
        memory_ceiling_mib: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        poll_s: float = 0.5,
        allow_cpu_fallback: bool = True,
        force_cpu: bool = False,
        backend: DeviceBackend | None = None,
    ) -> None:
        if memory_fraction is not None and not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        if memory_ceiling_mib is not None and memory_ceiling_mib <= 0:
            raise ValueError(f"memory_ceiling_mib must be > 0, got {memory_ceiling_mib}")
        if timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0 (0 = try once), got {timeout_s}")
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        if devices is not None and any(i < 0 for i in devices):
            raise ValueError(f"device indices must be >= 0, got {devices}")
        self.lock_dir = Path(lock_dir)
        self.devices = None if devices is None else list(dict.fromkeys(devices))
        self.memory_fraction = memory_fraction
        self.memory_ceiling_mib = memory_ceiling_mib
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.allow_cpu_fallback = allow_cpu_fallback
        self.force_cpu = force_cpu
        self.backend: DeviceBackend = backend if backend is not None else TorchCudaBackend()

    @classmethod
    def from_env(cls, lock_dir: Path | str | None = None, *, environ: dict[str, str] | None = None,
                 **kwargs: Any) -> "GpuLeaseManager":
        """A manager from explicit (non-None) settings over the environment (see LeaseSettings.from_env);
        other keyword arguments (backend, poll_s, allow_cpu_fallback) go to the constructor as they are."""
        given = {name: kwargs.pop(name, None) for name in LEASE_SETTING_NAMES}
        s = LeaseSettings.from_env(lock_dir, environ=environ, **given)
        return cls(s.lock_dir, **{name: getattr(s, name) for name in LEASE_SETTING_NAMES}, **kwargs)

    # ------------------------------------------------------------------ helpers

    def _cpu_reason(self) -> str | None:
        if self.force_cpu:
            return f"CPU forced ({ENV_FORCE_CPU}=1 or force_cpu=True)"
        if self.devices is not None and not self.devices:
            return "no CUDA device: the device list is empty"
        return self.backend.unavailable_reason()

    def _candidates(self, n_devices: int) -> list[int]:
        count = self.backend.device_count()
        candidates = list(range(count)) if self.devices is None else self.devices
        missing = [i for i in candidates if i >= count]
        if missing:
            raise ValueError(f"GPU lease: devices {missing} requested but only {count} CUDA device(s) are visible")
        if n_devices > len(candidates):
            raise ValueError(
                f"GPU lease: {n_devices} device(s) requested but only {len(candidates)} can be leased "
                f"({['cuda:%d' % i for i in candidates]}); this request could never be granted"
            )
        return candidates

    def _ceiling_fraction(self, index: int) -> tuple[float | None, float | None]:
        """(fraction to apply, total MiB) from memory_fraction and/or memory_ceiling_mib: the stricter wins."""
        if self.memory_fraction is None and self.memory_ceiling_mib is None:
            return None, None
        total = self.backend.total_mib(index)
        fractions = [] if self.memory_fraction is None else [self.memory_fraction]
        if self.memory_ceiling_mib is not None:
            if not total:
                raise RuntimeError(f"GPU lease: cannot turn memory_ceiling_mib into a fraction: total memory of cuda:{index} unknown")
            fractions.append(min(1.0, self.memory_ceiling_mib / total))
        return min(fractions), total

    # ------------------------------------------------------------------ lease

    @contextmanager
    def lease(
        self,
        n_devices: int = 1,
        *,
        owner: str = "",
        on_event: Callable[[LeaseEvent], None] | None = None,
    ) -> Iterator[Lease]:
        """Hold `n_devices` CUDA devices (or the CPU) for the body of the `with` block.

        `on_event` is called with every LeaseEvent as it happens (e.g. to log "waiting" live).
        Raises TimeoutError naming the busy devices and their holders when not granted in timeout_s.
        """
        if n_devices < 1:
            raise ValueError(f"n_devices must be >= 1, got {n_devices}")
        lease = Lease(uuid.uuid4().hex[:12], owner, on_event)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "owner": owner}
        requested_at = now_iso()
        t_requested = time.monotonic()
        cpu_reason = self._cpu_reason()
        if cpu_reason is not None and not (self.allow_cpu_fallback or self.force_cpu):
            raise RuntimeError(f"GPU lease for {owner!r}: {cpu_reason}, and CPU fallback is disabled")

        locks: list[DeviceLock] = []
        applied_fraction: float | None = None
        vram_before: list[VramSnapshot] = []
        if cpu_reason is not None:
            lease.devices, lease.is_cpu, lease.reason = ["cpu"], True, cpu_reason
            lease.record("requested", devices=[], n_devices=n_devices, owner=owner)
            lease.record("cpu_fallback", reason=cpu_reason)
        else:
            candidates = self._candidates(n_devices)
            lease.record(
                "requested", devices=[f"cuda:{i}" for i in candidates], n_devices=n_devices, owner=owner,
                timeout_s=self.timeout_s, lock_dir=str(self.lock_dir),
            )
            locks = self._acquire(lease, candidates, n_devices, holder)
            lease.devices = [lk.device for lk in locks]
            try:
                applied_fraction = self._prepare_devices(lease, locks)
                vram_before = [self.backend.snapshot(lk.index) for lk in locks]
            except BaseException:
                release_all(locks)
                raise
        wait_seconds = time.monotonic() - t_requested
        acquired_at = now_iso()
        lease.record("acquired", wait_seconds=round(wait_seconds, 6), cpu=lease.is_cpu)
        t_acquired = time.monotonic()
        pid_at_acquire = os.getpid()

        error: str | None = None
        try:
            yield lease
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
            raise
        finally:
            if os.getpid() == pid_at_acquire:  # a forked child must not release its parent's lease
                vram_after, peaks = self._release(lease, locks, applied_fraction, error)
                held_seconds = time.monotonic() - t_acquired
                lease.summary = LeaseSummary(
                    lease_id=lease.lease_id,
                    holder=holder,
                    devices=list(lease.devices),
                    cpu_fallback=lease.is_cpu,
                    reason=lease.reason,
                    wait_seconds=wait_seconds,
                    held_seconds=held_seconds,
                    memory_ceiling_fraction=applied_fraction,
                    memory_ceiling_mib=(
                        None if applied_fraction is None
                        else self._ceiling_mib(locks, applied_fraction)
                    ),
                    vram_before=vram_before,
                    vram_after=vram_after,
                    vram_peak_torch_mib=peaks,
                    events=list(lease.events),
                    requested_at=requested_at,
                    acquired_at=acquired_at,
                    released_at=lease.events[-1].ts,
                    error=error,
                )

    def _ceiling_mib(self, locks: list[DeviceLock], fraction: float) -> float | None:
        totals = [self.backend.total_mib(lk.index) for lk in locks]
        return None if any(t is None for t in totals) else min(totals) * fraction

    def _acquire(self, lease: Lease, candidates: list[int], n_devices: int, holder: dict) -> list[DeviceLock]:
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        all_locks = [DeviceLock(self.lock_dir, i, self.backend.lock_key(i)) for i in candidates]
        deadline = time.monotonic() + self.timeout_s
        attempts = 0
        announced_wait = False
        while True:
            attempts += 1
            got, busy = try_acquire_n(all_locks, n_devices)
            if got:
                write_notes(got, {**holder, "since": now_iso(), "lease_id": lease.lease_id})
                return got
            if not announced_wait:
                announced_wait = True
                lease.record(
                    "waiting", devices=[lk.device for lk in busy], n_devices=n_devices,
                    holders=[lk.describe_holder() for lk in busy],
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"GPU lease for owner {lease.owner!r}: could not get {n_devices} of "
                    f"{[lk.device for lk in all_locks]} within {self.timeout_s:g}s ({attempts} attempts); "
                    f"busy: {'; '.join(lk.describe_holder() for lk in busy)}; lock dir {self.lock_dir}"
                )
            time.sleep(min(self.poll_s, remaining))

    def _prepare_devices(self, lease: Lease, locks: list[DeviceLock]) -> float | None:
        applied: float | None = None
        for lk in locks:
            fraction, total = self._ceiling_fraction(lk.index)
            if fraction is not None:
                self.backend.set_memory_fraction(lk.index, fraction)
                applied = fraction if applied is None else min(applied, fraction)
                lease.record(
                    "ceiling_applied", devices=[lk.device], fraction=fraction,
                    ceiling_mib=None if total is None else round(total * fraction, 1), total_mib=total,
                    requested_fraction=self.memory_fraction, requested_mib=self.memory_ceiling_mib,
                )
            self.backend.reset_peak(lk.index)
        return applied

    def _release(
        self, lease: Lease, locks: list[DeviceLock], applied_fraction: float | None, error: str | None
    ) -> tuple[list[VramSnapshot], dict[str, float | None]]:
        vram_after: list[VramSnapshot] = []
        peaks: dict[str, float | None] = {}
        release_problems: list[str] = []
        try:
            for lk in locks:
                # Each step guarded: a failing device call must never keep the lock (or skip the rest).
                try:
                    self.backend.settle(lk.index)
                    peaks[lk.device] = self.backend.peak_allocated_mib(lk.index)
                    vram_after.append(self.backend.snapshot(lk.index))
                    if applied_fraction is not None:
                        self.backend.set_memory_fraction(lk.index, 1.0)  # the ceiling belongs to this lease only
                except Exception as exc:
                    release_problems.append(f"{lk.device}: {type(exc).__name__}: {exc}")
        finally:
            release_all(locks)
        detail: dict[str, Any] = {}
        if error:
            detail["error"] = error
        if release_problems:
            detail["release_problems"] = release_problems
        lease.record("released", **detail)
        return vram_after, peaks
