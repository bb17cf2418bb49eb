"""GPU lease as a Dagster resource: a thin adapter over rag_clean.gpu.lease.

Unset fields (None / "") fall back to the environment (RAG_CLEAN_GPU_*, RAG_CLEAN_FORCE_CPU), then
to built-in defaults; set fields win over the environment. Use inside an asset:

    with gpu_lease.lease(context) as lease:   # logs acquire / wait / release to the run log
        encoder = make_encoder(spec, device=lease.device)
        ...
    record["lease"] = lease.summary.to_dict()
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import dagster as dg

from rag_clean.config.settings import process_setting
from rag_clean.gpu import warmup
from rag_clean.gpu.devices import DeviceBackend
from rag_clean.gpu.lease import GpuLeaseManager, Lease, LeaseEvent
from rag_clean.gpu.lease_settings import default_lock_dir


def owner_label(context: Any) -> str:
    """'<asset key>[<partition>] run <id8>' from an asset / op context, as far as it knows."""
    try:
        name = context.asset_key.to_user_string()
    except Exception:  # op contexts and multi-assets have no single asset key
        op_def = getattr(context, "op_def", None)
        name = op_def.name if op_def is not None else "dagster"
    try:
        if context.has_partition_key:
            name = f"{name}[{context.partition_key}]"
    except Exception:
        pass
    run_id = getattr(context, "run_id", None)
    return f"{name} run {run_id[:8]}" if run_id else name


# A wait for a device shorter than this is the lease's own bookkeeping: not worth a word in the log.
WAIT_WORTH_SAYING_S = 0.5
_CPU_NOTED: set[str] = set()  # runs whose log already says they run on the CPU


def _first_cpu_note(run_id: str | None) -> bool:
    if run_id is None:
        return True
    if run_id in _CPU_NOTED:
        return False
    if len(_CPU_NOTED) > 1000:  # a long-lived process: forget old runs
        _CPU_NOTED.clear()
    _CPU_NOTED.add(run_id)
    return True


class GpuLeaseResource(dg.ConfigurableResource):
    """Exclusive CUDA devices for a step, across processes; the CPU (and why) when there is no CUDA."""

    lock_dir: str = ""  # "" = $RAG_CLEAN_GPU_LOCK_DIR, else <tmp>/rag_clean-gpu-locks (machine-wide)
    memory_fraction: Optional[float] = None  # per-device ceiling for this process, (0, 1]
    memory_ceiling_mib: Optional[int] = None  # alternative ceiling in MiB; the stricter of the two wins
    timeout_s: Optional[float] = None  # default 3600
    devices: Optional[list[int]] = None  # torch indices that may be leased; default all visible
    force_cpu: Optional[bool] = None

    def setup_for_execution(self, context) -> None:
        # Once per run in process (per step process under multiprocess): warm while CPU steps work.
        if self._backend() is None and process_setting("warmup"):
            manager = self.manager()
            warmup.start(None if manager.force_cpu else warmup.single_cuda_device(manager.devices))

    def _backend(self) -> DeviceBackend | None:
        """The device backend; None = real torch / NVML. Tests override this to fake devices."""
        return None

    def lock_path(self) -> Path:
        return Path(self.lock_dir).expanduser() if self.lock_dir else default_lock_dir()

    def manager(self) -> GpuLeaseManager:
        return GpuLeaseManager.from_env(
            self.lock_path(),
            devices=self.devices,
            memory_fraction=self.memory_fraction,
            memory_ceiling_mib=self.memory_ceiling_mib,
            timeout_s=self.timeout_s,
            force_cpu=self.force_cpu,
            backend=self._backend(),
        )

    @contextmanager
    def lease(self, context_or_owner: Any = None, n_devices: int = 1) -> Iterator[Lease]:
        """Hold `n_devices` devices for the `with` body; logs through `context.log` when given a context."""
        if context_or_owner is None or isinstance(context_or_owner, str):
            owner, log = context_or_owner or "", None
        else:
            owner, log = owner_label(context_or_owner), context_or_owner.log

        run_id = getattr(context_or_owner, "run_id", None)
        cpu = {"yes": False}

        def log_event(ev: LeaseEvent) -> None:
            if log is None:
                return
            if ev.event == "waiting":
                log.info(f"GPU lease {owner!r}: waiting for {n_devices} device(s); busy: {'; '.join(ev.detail['holders'])}")
            elif ev.event == "cpu_fallback":
                cpu["yes"] = True
                # A machine without CUDA is a fact of the run, not a problem of each step: said once per run.
                if _first_cpu_note(run_id):
                    log.info(f"running on CPU: {ev.detail['reason']} (GPU steps of this run use the CPU)")
                else:
                    log.debug(f"GPU lease {owner!r}: running on CPU")
            elif ev.event == "acquired":
                wait = ev.detail["wait_seconds"]
                if cpu["yes"]:  # the CPU is never waited for: the time is the lease's setup, not a queue
                    log.debug(f"GPU lease {owner!r}: CPU granted ({wait:.2f}s setup)")
                else:
                    log.info(f"GPU lease {owner!r}: acquired {ev.devices}"
                             + (f" after waiting {wait:.1f}s" if wait >= WAIT_WORTH_SAYING_S else ""))
            elif ev.event == "ceiling_applied":
                log.info(f"GPU lease {owner!r}: memory ceiling on {ev.devices}: {ev.detail['fraction']:.3f} ({ev.detail['ceiling_mib']} MiB)")

        lease: Lease | None = None
        try:
            with self.manager().lease(n_devices, owner=owner, on_event=log_event) as lease:
                yield lease
        finally:
            if log is not None and lease is not None and lease.summary is not None:
                s = lease.summary
                outcome = f" (body raised {s.error})" if s.error else ""
                peaks = {d: round(v) for d, v in (s.vram_peak_torch_mib or {}).items() if v is not None}
                line = (f"GPU lease {owner!r}: released {s.devices} after {s.held_seconds:.1f}s{outcome}"
                        + (f"; torch peak MiB {peaks}" if peaks else ""))
                (log.debug if s.cpu_fallback and not s.error else log.info)(line)
