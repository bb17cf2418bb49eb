"""The Dagster instance rag_clean writes into $DAGSTER_HOME/dagster.yaml, and how its `gpu` pool recovers.

Three problems of a plain Dagster 1.13 instance, and what this module does about them:

- A run killed with SIGKILL keeps its slot in the `gpu` pool forever (the `concurrency_slots` table);
  marking the run failed does not free it, and the default run launcher cannot tell that the run's
  process is gone. `PoolReclaimingEventLogStorage` checks, whenever a claim is blocked, whether the runs
  holding the pool are still alive (the pid of the run's "Executing steps in process" event, with its
  start time so a reused pid does not count); dead runs are marked failed and their slots freed. This
  runs in every process that claims slots: `dagster asset materialize`, `rag-clean`, runs launched from
  the UI, with or without a daemon. `reclaim_dead_runs` does the same for every run, on demand.
- Dagster's step loop polls a blocked claim without sleeping (1.13's
  `interval_to_next_pending_claim_check` is never positive), so a waiting run spins at 100% CPU, and it
  swallows SIGINT/SIGTERM until a step runs. A blocked claim here sleeps briefly inside
  `raise_execution_interrupts()`: waiting costs no CPU and Ctrl-C / SIGTERM end the run at once.
- Two runs of one collection at once (a second backfill of the same partitions, a UI launch beside an
  automation run) would write the same files. The written config keeps Dagster's QueuedRunCoordinator
  (no "not advised" warning in the backfill dialog) with a run tag limit: one run in progress per value
  of `dagster/partition` (every run of this graph carries it: no backfill policy, so backfills and
  automation request one plain run per collection). Runs of different collections start side by side.
  The daemon (`rag-clean ui` = `dagster dev`) dequeues every second, so a launched run starts at once;
  GPU steps still wait for the `gpu` pool at step level. `dagster asset materialize` and `rag-clean`
  execute in their own process, not through the queue.

The pool limit is the number of visible GPUs (min 1); without CUDA there is no limit, since the GPU
lease then grants every step the CPU and the OS shares the cores.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import dagster as dg
from dagster._config import Field, StringSource
from dagster._core.errors import raise_execution_interrupts
from dagster._core.events import DagsterEventType
from dagster._core.storage.dagster_run import FINISHED_STATUSES, DagsterRunStatus, RunsFilter
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

from rag_clean.config.settings import process_setting
from rag_clean.gpu.devices import nvml_visible_count
from rag_clean.processes import process_alive
# Imported for its effect: the webserver and the daemon load this module (the event log storage class of
# the dagster.yaml written here), and their stale-status answers must include partitions (staleness.py).
from rag_clean_assets import staleness  # noqa: F401

GPU_POOL = "gpu"
PARTITION_TAG = "dagster/partition"
CONFIG_MARKER = "# Written by rag_clean"
# How long a blocked claim waits before Dagster's loop asks again: short enough that a freed slot is
# picked up promptly, long enough that waiting costs nothing.
BLOCKED_CLAIM_WAIT_S = 0.5
# How often a blocked process checks whether the pool's holders are still alive.
RECLAIM_EVERY_S = 2.0
_IN_PROGRESS = (DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING)


# ---------------------------------------------------------------- dagster.yaml


def visible_gpu_count(environ=None) -> int:
    """GPUs the lease could grant, counted without importing torch (NVML; 0 when there is none)."""
    env = os.environ if environ is None else environ
    if process_setting("force_cpu", env):
        return 0
    devices = process_setting("gpu_devices", env)
    if devices is not None:
        return len(devices)
    return nvml_visible_count(env)


def gpu_pool_limit(environ=None) -> int | None:
    """Slots of the `gpu` pool: $RAG_CLEAN_GPU_POOL_LIMIT (0 = none) if set, else one per GPU;
    None (unlimited) on a machine without CUDA."""
    value = process_setting("gpu_pool_limit", environ)
    if value is not None:
        return value if value > 0 else None
    count = visible_gpu_count(environ)
    return max(1, count) if count > 0 else None


def dagster_yaml(environ=None) -> str:
    limit = gpu_pool_limit(environ)
    if limit is None:
        pools = ("    # No CUDA here: the lease grants the CPU to every step, so GPU steps need no pool limit.\n"
                 "    granularity: op\n")
    else:
        pools = (f"    # At most {limit} GPU step(s) at a time: one per GPU, or $RAG_CLEAN_GPU_POOL_LIMIT.\n"
                 f"    default_limit: {limit}\n    granularity: op\n")
    return f"""\
{CONFIG_MARKER} (python -m rag_clean_assets.collections init-home); edit freely, then delete this line
# so init-home leaves the file alone.
concurrency:
  pools:
{pools}  # One run at a time per collection (a second backfill of the same partitions waits); different
  # collections run side by side. Every run of this graph is tagged with its collection.
  runs:
    tag_concurrency_limits:
      - key: {PARTITION_TAG}
        value:
          applyLimitPerUniqueValue: true
        limit: 1
# Queued runs are started by the daemon (rag-clean ui, i.e. dagster dev): checked every second, so a
# launched run starts at once. dagster-webserver alone leaves them QUEUED.
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
# Blocked GPU steps free the slots of runs whose process died (kill -9) and wait without spinning.
event_log_storage:
  module: rag_clean_assets.instance
  class: PoolReclaimingEventLogStorage
# With a daemon (dagster dev): fail runs stuck starting/canceling, free slots of finished runs.
run_monitoring:
  enabled: true
  start_timeout_seconds: 180
  cancel_timeout_seconds: 180
  max_resume_run_attempts: 0
  poll_interval_seconds: 30
  free_slots_after_run_end_seconds: 10
# Runs without logger config (launched from the UI, `dagster asset materialize`) print INFO and up in their
# terminal / compute logs; the event log (the UI's run view) keeps every event.
python_logs:
  python_log_level: INFO
telemetry:
  enabled: false
nux:
  enabled: false
"""


# ---------------------------------------------------------------- liveness of a run's process


def run_process(instance: dg.DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """(pid, timestamp) of the process executing the run's steps, from its engine event."""
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        data = entry.dagster_event.engine_event_data if entry.dagster_event else None
        pid = (data.metadata or {}).get("pid") if data else None
        if pid is not None:
            try:
                return int(getattr(pid, "value", pid)), float(entry.timestamp)
            except (TypeError, ValueError):
                continue
    return None


def dead_reason(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """Why the run can no longer use its slots, or None while it may still be running."""
    run = instance.get_run_by_id(run_id)
    if run is None:
        return "the run no longer exists"
    if run.status in FINISHED_STATUSES:
        return f"the run already ended ({run.status.value})"
    found = run_process(instance, run_id)
    if found is None:
        return None  # not executing steps yet (or its launcher records no pid): cannot tell, keep it
    pid, since = found
    if process_alive(pid, not_after=since):
        return None
    return f"its process (pid {pid}) is gone"


def release_run(instance: dg.DagsterInstance, run_id: str, reason: str) -> None:
    """Mark a dead run failed (if it is not finished) and free its pool slots and pending claims."""
    run = instance.get_run_by_id(run_id)
    if run is not None and run.status not in FINISHED_STATUSES:
        instance.report_run_failed(run, f"rag_clean: marked failed because {reason}; its pool slots were freed")
    instance.event_log_storage.free_concurrency_slots_for_run(run_id)


def reclaim_dead_runs(instance: dg.DagsterInstance, exclude: str | None = None) -> dict[str, str]:
    """Release every run that holds pool slots or is in progress but whose process is gone.
    Returns {run_id: reason}. Safe to call any time: live runs are left alone."""
    storage = instance.event_log_storage
    candidates = set(storage.get_concurrency_run_ids()) if storage.supports_global_concurrency_limits else set()
    candidates |= {r.dagster_run.run_id for r in instance.get_run_records(RunsFilter(statuses=list(_IN_PROGRESS)))}
    released = {}
    for run_id in sorted(candidates - {exclude}):
        reason = dead_reason(instance, run_id)
        if reason is not None:
            release_run(instance, run_id, reason)
            released[run_id] = reason
    return released


# ---------------------------------------------------------------- the event log storage


class PoolReclaimingEventLogStorage(SqliteEventLogStorage):
    """The default SQLite event log storage (same files), whose blocked pool claims wait cheaply,
    interruptibly, and reclaim slots of dead runs. See the module docstring."""

    def __init__(self, base_dir: str | None = None, inst_data=None):
        # The default location of a DAGSTER_HOME without storage config: existing homes keep their runs.
        base_dir = base_dir or str(Path(os.environ.get("DAGSTER_HOME") or ".").resolve() / "history" / "runs")
        super().__init__(base_dir, inst_data=inst_data)
        self._last_reclaim = 0.0
        self._asked_since_wait: set[tuple[str, str]] = set()

    @classmethod
    def config_type(cls):
        return {"base_dir": Field(StringSource, is_required=False)}

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data=inst_data, **config_value)

    def claim_concurrency_slot(self, concurrency_key: str, run_id: str, step_key: str, priority: int | None = None):
        status = super().claim_concurrency_slot(concurrency_key, run_id, step_key, priority)
        if status.is_claimed:
            self._asked_since_wait.discard((run_id, step_key))
            return status
        now = time.monotonic()
        if now - self._last_reclaim >= RECLAIM_EVERY_S and self.has_instance:
            self._last_reclaim = now
            if self._release_dead_holders(concurrency_key, run_id):
                status = super().claim_concurrency_slot(concurrency_key, run_id, step_key, priority)
                if status.is_claimed:
                    return status
        # Dagster asks for every blocked step once per loop turn, without sleeping in between: wait once
        # per turn (when a step is asked for again), interruptibly.
        if (run_id, step_key) in self._asked_since_wait:
            self._asked_since_wait.clear()
            with raise_execution_interrupts():
                time.sleep(BLOCKED_CLAIM_WAIT_S)
        self._asked_since_wait.add((run_id, step_key))
        # Ask again on the next turn (not after Dagster's 1-15 s back-off, which it spends spinning).
        return status.with_sleep_interval(0.0)

    def _release_dead_holders(self, concurrency_key: str, own_run_id: str) -> bool:
        info = self.get_concurrency_info(concurrency_key)
        holders = {slot.run_id for slot in info.claimed_slots}
        holders |= {step.run_id for step in info.pending_steps if step.assigned_timestamp is not None}
        released = False
        for run_id in holders - {own_run_id}:
            reason = dead_reason(self._instance, run_id)
            if reason is not None:
                release_run(self._instance, run_id, reason)
                released = True
        return released
