"""GPU lease: exclusive use of N CUDA devices across processes, with a memory ceiling and VRAM snapshots.

How exclusivity works
- One lock file per physical device under `lock_dir`, locked with `fcntl.flock`. The kernel drops
  a flock when the holder's last descriptor closes, so a holder killed with SIGKILL can never leave
  a device stuck. Lock files are never deleted (deleting a flock file races with waiters).
- Next to each lock, a JSON holder note (pid, host, owner, since) for humans and error messages.
  The lock is the truth: a stale note left by a killed holder is simply overwritten.
- N devices are taken all or nothing: one attempt tries every candidate without blocking; if it
  got fewer than N it lets go of them and polls again. Nobody holds a device while waiting, so two
  N=2 requesters cannot deadlock. There is no queue: a large request can wait behind a stream of
  small ones until `timeout_s`.
- Lock files are keyed by the device UUID when torch reports it, so processes with different
  CUDA_VISIBLE_DEVICES still contend for the same physical GPU.
- Not re-entrant: a second lease for a device this process already holds waits like anyone else
  (flock treats separate opens in one process independently).
- Forked children (DataLoader workers, tokenizer pools) close inherited lock descriptors right after
  fork, so a surviving child cannot keep a dead parent's device locked.

Without CUDA (or with RAG_CLEAN_FORCE_CPU=1) a lease grants "cpu", says why, and takes no lock:
CPU work is not serialised here (the OS schedules it; Dagster pools can limit concurrency).

Every torch / NVML call goes through a `DeviceBackend`, so tests run the real locking code against
`FakeDeviceBackend` on machines without a GPU.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

ENV_DEVICES = "RAG_CLEAN_GPU_DEVICES"
ENV_MEMORY_FRACTION = "RAG_CLEAN_GPU_MEMORY_FRACTION"
ENV_MEMORY_CEILING_MIB = "RAG_CLEAN_GPU_MEMORY_CEILING_MIB"
ENV_TIMEOUT_S = "RAG_CLEAN_GPU_LEASE_TIMEOUT_S"
ENV_FORCE_CPU = "RAG_CLEAN_FORCE_CPU"
ENV_LOCK_DIR = "RAG_CLEAN_GPU_LOCK_DIR"

_MIB = 1024.0 * 1024.0
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def default_lock_dir() -> Path:
    """$RAG_CLEAN_GPU_LOCK_DIR, else one machine-wide folder in the temp dir.

    Machine-wide on purpose: a GPU is shared by every checkout, Dagster instance and benchmark on the
    box, so they must all contend for the same lock files.
    """
    explicit = os.environ.get(ENV_LOCK_DIR)
    if explicit:
        return Path(explicit).expanduser()
    return Path(tempfile.gettempdir()) / "rag_clean-gpu-locks"


# --------------------------------------------------------------------------- records


@dataclass
class LeaseEvent:
    ts: str
    event: str  # requested | waiting | acquired | ceiling_applied | cpu_fallback | released | user events
    devices: list[str]
    detail: dict = field(default_factory=dict)


@dataclass
class VramSnapshot:
    device: str
    used_mib: float | None          # whole device, all processes (NVML) or free/total from the driver (torch)
    total_mib: float | None
    torch_allocated_mib: float | None  # this process's live tensors
    torch_reserved_mib: float | None   # this process's caching-allocator pool
    source: str  # "nvml" | "torch" | "unavailable" | "fake"
    ts: str = field(default_factory=_now_iso)


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


# --------------------------------------------------------------------------- device backends


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


class FakeDeviceBackend:
    """Simulated CUDA devices for tests on machines without a GPU: real locks, no device work.

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


# --------------------------------------------------------------------------- locks

_held_lock_fds: set[int] = set()
_held_lock_fds_guard = threading.Lock()


def _close_lock_fds_in_forked_child() -> None:
    # The child's copies share the parent's open file description; closing them in the child
    # leaves the parent's lock intact but stops a long-lived child from pinning it after the parent dies.
    for fd in list(_held_lock_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    _held_lock_fds.clear()


os.register_at_fork(after_in_child=_close_lock_fds_in_forked_child)


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)


class _DeviceLock:
    def __init__(self, lock_dir: Path, index: int, key: str) -> None:
        self.index = index
        self.key = key
        self.device = f"cuda:{index}"
        self.lock_path = lock_dir / f"device-{_safe_name(key)}.lock"
        self.note_path = lock_dir / f"device-{_safe_name(key)}.holder.json"
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        with _held_lock_fds_guard:
            _held_lock_fds.add(fd)
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            self.note_path.unlink()
        except FileNotFoundError:
            pass
        with _held_lock_fds_guard:
            _held_lock_fds.discard(fd)
        os.close(fd)  # closing the last descriptor drops the flock

    def write_note(self, note: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.note_path.parent, prefix=".holder-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({**note, "device": self.device, "device_key": self.key}, fh)
            os.replace(tmp, self.note_path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def read_note(self) -> dict | None:
        try:
            return json.loads(self.note_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def describe_holder(self) -> str:
        note = self.read_note()
        if note is None:
            return f"{self.device} held by an unknown process (no readable holder note at {self.note_path})"
        return (
            f"{self.device} held by pid {note.get('pid')} on {note.get('host')} "
            f"(owner {note.get('owner')!r}, since {note.get('since')})"
        )


# --------------------------------------------------------------------------- lease


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
        ev = LeaseEvent(_now_iso(), event, list(self.devices if devices is None else devices), detail)
        self.events.append(ev)
        if self._on_event is not None:
            self._on_event(ev)
        return ev


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r}: expected one of 1/0, true/false, yes/no")


def _parse_float(name: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected a number") from None


def _parse_devices(name: str, raw: str) -> list[int]:
    try:
        return [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected comma-separated device indices like '0,1'") from None


class GpuLeaseManager:
    def __init__(
        self,
        lock_dir: Path | str,
        *,
        devices: list[int] | None = None,
        memory_fraction: float | None = None,
        memory_ceiling_mib: int | None = None,
        timeout_s: float = 3600,
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
    def from_env(
        cls,
        lock_dir: Path | str | None = None,
        *,
        devices: list[int] | None = None,
        memory_fraction: float | None = None,
        memory_ceiling_mib: int | None = None,
        timeout_s: float | None = None,
        force_cpu: bool | None = None,
        environ: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> "GpuLeaseManager":
        """The one place lease settings are read from the environment.

        Precedence: built-in defaults < environment < explicit (non-None) arguments, so Dagster
        resource config overrides the environment. Variables: RAG_CLEAN_GPU_DEVICES ("0,1"),
        RAG_CLEAN_GPU_MEMORY_FRACTION, RAG_CLEAN_GPU_MEMORY_CEILING_MIB, RAG_CLEAN_GPU_LEASE_TIMEOUT_S,
        RAG_CLEAN_FORCE_CPU=1.
        """
        env = os.environ if environ is None else environ
        if devices is None and env.get(ENV_DEVICES, "").strip():
            devices = _parse_devices(ENV_DEVICES, env[ENV_DEVICES])
        if memory_fraction is None and env.get(ENV_MEMORY_FRACTION, "").strip():
            memory_fraction = _parse_float(ENV_MEMORY_FRACTION, env[ENV_MEMORY_FRACTION])
        if memory_ceiling_mib is None and env.get(ENV_MEMORY_CEILING_MIB, "").strip():
            memory_ceiling_mib = int(_parse_float(ENV_MEMORY_CEILING_MIB, env[ENV_MEMORY_CEILING_MIB]))
        if timeout_s is None and env.get(ENV_TIMEOUT_S, "").strip():
            timeout_s = _parse_float(ENV_TIMEOUT_S, env[ENV_TIMEOUT_S])
        if force_cpu is None:
            force_cpu = _parse_bool(ENV_FORCE_CPU, env.get(ENV_FORCE_CPU, ""))
        return cls(
            default_lock_dir() if lock_dir is None else lock_dir,
            devices=devices,
            memory_fraction=memory_fraction,
            memory_ceiling_mib=memory_ceiling_mib,
            timeout_s=3600 if timeout_s is None else timeout_s,
            force_cpu=force_cpu,
            **kwargs,
        )

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
        requested_at = _now_iso()
        t_requested = time.monotonic()
        cpu_reason = self._cpu_reason()
        if cpu_reason is not None and not (self.allow_cpu_fallback or self.force_cpu):
            raise RuntimeError(f"GPU lease for {owner!r}: {cpu_reason}, and CPU fallback is disabled")

        locks: list[_DeviceLock] = []
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
                for lk in locks:
                    lk.release()
                raise
        wait_seconds = time.monotonic() - t_requested
        acquired_at = _now_iso()
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

    def _ceiling_mib(self, locks: list[_DeviceLock], fraction: float) -> float | None:
        totals = [self.backend.total_mib(lk.index) for lk in locks]
        return None if any(t is None for t in totals) else min(totals) * fraction

    def _acquire(self, lease: Lease, candidates: list[int], n_devices: int, holder: dict) -> list[_DeviceLock]:
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        all_locks = [_DeviceLock(self.lock_dir, i, self.backend.lock_key(i)) for i in candidates]
        deadline = time.monotonic() + self.timeout_s
        attempts = 0
        announced_wait = False
        while True:
            attempts += 1
            got: list[_DeviceLock] = []
            busy: list[_DeviceLock] = []
            for lk in all_locks:
                if len(got) == n_devices:
                    break
                (got if lk.try_acquire() else busy).append(lk)
            if len(got) == n_devices:
                note = {**holder, "since": _now_iso(), "lease_id": lease.lease_id}
                try:
                    for lk in got:
                        lk.write_note(note)
                except BaseException:
                    for lk in got:
                        lk.release()
                    raise
                return got
            for lk in got:  # all or nothing: never sit on part of a request while waiting
                lk.release()
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

    def _prepare_devices(self, lease: Lease, locks: list[_DeviceLock]) -> float | None:
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
        self, lease: Lease, locks: list[_DeviceLock], applied_fraction: float | None, error: str | None
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
            for lk in locks:
                lk.release()
        detail: dict[str, Any] = {}
        if error:
            detail["error"] = error
        if release_problems:
            detail["release_problems"] = release_problems
        lease.record("released", **detail)
        return vram_after, peaks
