"""One stage context and one `run_stage`: the plumbing every stage shares, in one place.

A `StageContext` is bound to one collection of one run: the run plan, the storage layout, how to take
the GPU lease (a callable passed in by whoever owns it: the Dagster resource, a benchmark; the engine
never imports Dagster), a progress callback and a logger. A `Stage` declares what differs between
stages: its compute function, the asset file it stages, when the plan turns it off, whether it needs
the GPU. `run_stage(ctx, stage, *inputs)` then owns, for every stage:

- the timer (start and duration stamped on the record),
- the disabled check (the plan says why a stage is off: nothing written, the previous file stays),
- the staged output (`StageIO.target`, where writers stage their temp files) and its abort on error:
  everything the stage registered with `StageIO.stage` follows the staged-file protocol of
  rag_clean.storage.staged (the writer the stage returns is published by the IO manager's one
  `publish()`, its side files attached to it; on error `abort()` removes every temp and scratch file),
- the previous file to reuse rows from (`StageIO.previous`: the stored output, unless reuse is off;
  stages read it with rag_clean.storage.previous.read_previous),
- the GPU lease for GPU stages (none when the work goes to a Ray cluster),
- finishing the record (settings and their provenance, the lease summary and events, warnings logged).

A stage's compute function is `(ctx, io, *inputs) -> (value, record)`: 3-5 parameters, only compute.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Protocol, Sequence, TypeVar

from rag_clean.config.models import ResolvedModel
from rag_clean.config.plan import RunPlan
from rag_clean.config.registry import ModelSpec
from rag_clean.gpu import warmup
from rag_clean.storage.layout import StorageLayout
from rag_clean.storage.staged import abort_on_error
from rag_clean.telemetry.records import StageRecord
from rag_clean.telemetry.summary import utc_now

log = logging.getLogger(__name__)
R = TypeVar("R", bound=StageRecord)


class Abortable(Protocol):
    """What `StageIO.stage` takes: a staged writer (rag_clean.storage.staged.Staged) or a helper that
    owns staged files and scratch (JointSideFiles)."""

    def abort(self) -> None: ...


class StageTimer:
    """Measures a stage's wall time and stamps start/end on its record."""

    def __init__(self) -> None:
        self.started_at = utc_now()
        self._t0 = time.perf_counter()

    def stamp(self, record: R) -> R:
        record.started_at = record.started_at or self.started_at
        record.duration_s = round(time.perf_counter() - self._t0, 6)
        return record


@dataclass
class StageContext:
    collection: str
    plan: RunPlan
    layout: StorageLayout
    lease: Callable[[], ContextManager] | None = None   # enter to hold the GPU; None: no lease (CPU, tests)
    progress: Callable[[str], None] | None = None       # done/total, rate and ETA lines while encoding
    log: Any = log                                      # .info / .warning (a Dagster log manager or a Logger)
    # The collection folder (chunks, queries, reranked read it), looked up when asked: a stage that does not
    # read it never fails on it. None: no folder (engine callers; queries then come from chunk headings).
    collection_dir: Callable[[], Path] | None = None
    run_id: str | None = None
    device: str | list[str] = "cpu"                     # set by run_stage from the lease
    token_budget: int | None = None                     # a fixed token budget (benchmarks, tests); None: adaptive
    timer: StageTimer = field(default_factory=StageTimer)

    @property
    def folder(self) -> Path | None:
        return self.collection_dir() if self.collection_dir is not None else None

    def model(self, spec: ModelSpec) -> ResolvedModel:
        """The run plan's resolution of `spec` (source, folder, fingerprint), resolved once per run."""
        return self.plan.models.get(spec)

    def budget_store(self):
        from rag_clean.encoders.batching import BudgetStore

        return BudgetStore(self.layout.budget_store_file())

    def token_cache(self):
        from rag_clean.encoders.token_cache import TokenCache

        return TokenCache.for_collection(self.layout, self.collection)


S = TypeVar("S", bound=Abortable)


@dataclass
class StageIO:
    """The stage's output file and the file it may reuse rows from; what it stages is aborted on error."""

    target: Path | None            # where the IO manager publishes the output (None: an in-memory value)
    previous: Path | None = None   # the stored output, when reuse is on and it exists
    staged: list[Abortable] = field(default_factory=list)

    def stage(self, obj: S) -> S:
        """Register a staged writer (rag_clean.storage.staged.Staged) or a helper that stages files for one
        (JointSideFiles): its `abort()` runs if the stage fails. Publishing stays with the writer's own
        `publish()` (the IO manager's one call), so there is one lifecycle."""
        self.staged.append(obj)
        return obj

    def abort(self) -> None:
        for obj in reversed(self.staged):
            with contextlib.suppress(Exception):  # the stage's own error is the one to report
                obj.abort()
        self.staged.clear()


@dataclass
class EmbeddedChunks:
    """What the reranked and exports stages read: the chunks and their stored vectors."""

    chunks: Any                                            # pa.Table
    fused: Any                                             # EmbeddingSet of fused_embeddings
    dense_sets: Mapping[str, Any] = field(default_factory=dict)   # asset name -> EmbeddingSet (None: no file)
    sparse: Any = None                                     # stored sparse_vectors: table or Parquet file; None: none


@dataclass(frozen=True)
class Stage:
    """What differs between stages. `asset(*inputs)` -> the asset key path of the file it stages (None: no
    file); `disabled(plan, *inputs)` -> the record of a stage the plan turns off, else None; `lease(plan,
    *inputs)` -> "gpu" (hold the local GPU lease), "remote" (the work runs on the Ray cluster) or "none"."""

    name: str
    compute: Callable[..., tuple[Any, StageRecord]]
    asset: Callable[..., Sequence[str] | None] = lambda *inputs: None
    disabled: Callable[..., StageRecord | None] = lambda plan, *inputs: None
    lease: Callable[..., str] = lambda plan, *inputs: "none"


@dataclass
class RemoteLease:
    """Stands in for a GPU lease when the encode runs on the Ray cluster: no local device is held."""

    devices: list[str] = field(default_factory=lambda: ["cpu"])
    device: str = "cpu"
    summary: None = None
    events: list = field(default_factory=list)


@dataclass
class StageOutput:
    """`value` is a table (written as Parquet, or Arrow IPC where the layout says .arrow), a staged writer
    (rag_clean.storage.staged.Staged: EmbeddingWriter / ColumnSpool, Arrow IPC; TableWriter, Parquet) that
    the IO manager publishes with its `publish()` (side files attached to it follow), or None when the
    stage is disabled: then nothing is written and the previous file stays."""

    value: Any
    record: StageRecord

    @property
    def disabled(self) -> bool:
        return self.value is None


def start_record(record: StageRecord, plan: RunPlan) -> StageRecord:
    """The settings (and their sources) every stage record carries; retired settings noted once, on chunks."""
    toggles = plan.toggles()
    record.toggles, record.provenance = toggles["toggles"], toggles["provenance"]
    if record.stage == "chunks":
        record.warnings += list(plan.settings.notes)
    return record


def add_lease(record: StageRecord, lease) -> StageRecord:
    """Attach a finished lease (summary computed at release, its events) to a stage record."""
    record.lease = lease.summary.to_dict() if lease.summary else None
    record.events = [{"ts": e.ts, "event": f"lease.{e.event}", "detail": {"devices": e.devices, **e.detail}}
                     for e in lease.events]
    record.device = record.device or lease.device
    return record


def lease_target(lease) -> str | list[str]:
    """What the encoders take: one device string, or the list when the lease holds several GPUs."""
    return lease.devices if len(lease.devices) > 1 else lease.device


@contextlib.contextmanager
def _held(ctx: StageContext, mode: str):
    if mode == "gpu" and ctx.lease is not None:
        note = warmup.wait()  # its imports finish before this step imports anything itself
        if note:
            (ctx.log.info if note.cuda else ctx.log.debug)(note.text)
        with ctx.lease() as lease:
            yield lease
    elif mode == "remote":
        # Holding a local card while the work runs elsewhere would block other steps for nothing.
        ray = ctx.plan.ray
        ctx.log.info(f"encoding on the Ray cluster {ray.address!r} ({ray.actors} actors): no local GPU lease")
        yield RemoteLease()
    else:
        yield None


def run_stage(ctx: StageContext, stage: Stage, *inputs) -> StageOutput:
    """Run one stage for `ctx.collection` (see the module docstring for what this owns)."""
    ctx.timer = timer = StageTimer()
    off = stage.disabled(ctx.plan, *inputs)
    if off is not None:
        ctx.log.info(off.reason)
        off.status = "disabled"
        return StageOutput(None, timer.stamp(start_record(off, ctx.plan)))
    asset = stage.asset(*inputs)
    target = ctx.layout.staged_asset_file(list(asset), ctx.collection) if asset else None
    previous = target if target is not None and ctx.plan.reuse_unchanged and target.exists() else None
    io = StageIO(target, previous)
    with _held(ctx, stage.lease(ctx.plan, *inputs)) as lease:
        if lease is not None:
            ctx.device = lease_target(lease)
        with abort_on_error(io):
            value, record = stage.compute(ctx, io, *inputs)
    record = start_record(record, ctx.plan)
    if lease is not None:
        add_lease(record, lease)
    for warning in record.warnings:
        ctx.log.warning(warning)
    return StageOutput(value, timer.stamp(record))
