"""`rag-clean`'s progress display: per collection, one bar per asset step, fed by the run's Dagster events.

A step's bar starts at STEP_START, follows the encode progress lines of that step (rag_clean.telemetry.progress:
"<model>: done/total chunks ...", at least every 10 s or 5% of the rows) and is set to 100% at
STEP_SUCCESS. A step without progress lines counts as one unit. While a model loads (the engine's DEBUG
"loading model <name>", seconds to tens of seconds before the first progress line) the bar says so and pulses
instead of sitting at 0. On a terminal it is a `rich` live
display; when stdout is not a TTY (CI, a pipe) it prints plain lines instead, one per step start,
progress line and step end, so logs stay readable.

It listens as a Dagster logger (`logger_def`), which every run of the job calls with each event and
each `context.log` line; nothing in the assets knows about it.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import IO

import dagster as dg
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from rag_clean.telemetry.progress import loading_line, parse_line, parse_loading

LOGGER_KEY = "rag_clean_progress"


@dataclass
class _Step:
    name: str
    task: TaskID | None = None
    done: int = 0
    total: int = 1
    state: str = "pending"  # pending, running, done, failed
    models: dict[str, tuple[int, int]] = field(default_factory=dict)
    loading: str | None = None  # the model being loaded, until its first progress line


class RunProgress:
    """steps: {step key: display name} of the asset steps, in graph order."""

    def __init__(self, steps: dict[str, str], *, stream: IO[str] | None = None, tty: bool | None = None,
                 console: Console | None = None):
        self.step_names = dict(steps)
        self.stream = stream or sys.stdout
        self.tty = (self.stream.isatty() if hasattr(self.stream, "isatty") else False) if tty is None else tty
        self.console = console or Console(file=self.stream, force_terminal=self.tty or None)
        self.progress: Progress | None = None
        if self.tty:
            self.progress = Progress(TextColumn("{task.description}", justify="left"), BarColumn(),
                                     MofNCompleteColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                                     TimeRemainingColumn(), console=self.console, redirect_stdout=True,
                                     redirect_stderr=True)
        self.collection: str | None = None
        self.steps: dict[str, _Step] = {}
        self.header: TaskID | None = None
        self.finished: dict[str, dict[str, float]] = {}  # collection -> {step key: percent shown at its end}

    def __enter__(self) -> "RunProgress":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    # -- what the CLI calls --------------------------------------------------------------------

    def start_collection(self, collection: str) -> None:
        self.collection = collection
        self.steps = {key: _Step(name) for key, name in self.step_names.items()}
        if self.progress is not None:
            self.header = self.progress.add_task(f"[bold]{collection}[/bold] steps", total=len(self.steps))
            for step in self.steps.values():  # started at STEP_START, so elapsed and ETA are the step's own
                step.task = self.progress.add_task(f"  {collection} · {step.name}", total=1, start=False)
        else:
            self._plain(f"{collection}: {len(self.steps)} steps")

    def finish_collection(self, ok: bool) -> None:
        """The collection's bars leave the live display (it holds the running collection only, however many
        follow) and one line stays: how many steps finished."""
        done = sum(1 for s in self.steps.values() if s.state == "done")
        line = f"{self.collection}: {'finished' if ok else 'FAILED'} ({done}/{len(self.steps)} steps done)"
        self.finished[self.collection] = {key: self.percent(key) for key in self.steps}
        if self.progress is None:
            self._plain(line)
            return
        for task in [self.header, *(s.task for s in self.steps.values())]:
            if task is not None:
                self.progress.remove_task(task)
        self.header = None
        self.console.print(line)

    # -- what the Dagster logger feeds -----------------------------------------------------------

    def on_record(self, step_key: str | None, event_type: str | None, message: str) -> None:
        step = self.steps.get(step_key or "")
        if step is None:
            return
        if event_type == "STEP_START":
            step.state = "running"
            if self.progress is not None and step.task is not None:
                self.progress.start_task(step.task)
            self._plain(f"{self.collection} {step.name}: started")
        elif event_type == "STEP_SUCCESS":
            step.state, step.done, step.loading = "done", step.total, None
            self._update(step)
            if self.progress is not None and self.header is not None:
                self.progress.advance(self.header)
            self._plain(f"{self.collection} {step.name}: done ({self._count()} steps)")
        elif event_type == "STEP_FAILURE":
            step.state = "failed"
            if self.progress is not None and step.task is not None:
                self.progress.update(step.task, description=f"  {self.collection} · {step.name} [red]failed[/red]")
            self._plain(f"{self.collection} {step.name}: FAILED")
        elif event_type is None:
            model = parse_loading(message)
            if model is not None:
                step.loading = model
                self._update(step)
                self._plain(f"{self.collection} {step.name}: {loading_line(model)}")
                return
            update = parse_line(message)
            if update is None:
                return
            # A step may encode several models (sparse): its bar is the sum over them.
            step.loading = None
            step.models[update.label] = (update.done, update.total)
            step.done = sum(d for d, _ in step.models.values())
            step.total = max(1, sum(t for _, t in step.models.values()))
            self._update(step)
            self._plain(f"{self.collection} {step.name}: {message}")

    # -- internals -----------------------------------------------------------------------------

    def _count(self) -> str:
        return f"{sum(1 for s in self.steps.values() if s.state == 'done')}/{len(self.steps)}"

    def _update(self, step: _Step) -> None:
        if self.progress is not None and step.task is not None:
            description = f"  {self.collection} · {step.name}"
            if step.loading is not None:
                self.progress.update(step.task, description=f"{description} · {loading_line(step.loading)}",
                                     completed=0)
                # No total: rich pulses the bar and counts "0/?" (update(total=None) means "unchanged").
                next(t for t in self.progress.tasks if t.id == step.task).total = None
            else:
                self.progress.update(step.task, description=description, completed=step.done, total=step.total)

    def _plain(self, line: str) -> None:
        if self.progress is None:
            print(line, file=self.stream, flush=True)

    def percent(self, step_key: str) -> float:
        """How far a step's bar is (0-100): what the display shows."""
        step = self.steps[step_key]
        task = next((t for t in self.progress.tasks if t.id == step.task), None) if self.progress is not None else None
        if task is not None:
            return float(task.percentage)
        return 100.0 * step.done / step.total


class _Handler(logging.Handler):
    def __init__(self, view: RunProgress):
        super().__init__(level=logging.DEBUG)
        self.view = view

    def emit(self, record: logging.LogRecord) -> None:
        meta = getattr(record, "dagster_meta", None) or {}
        event = meta.get("dagster_event")
        try:
            self.view.on_record(meta.get("step_key"), event.event_type_value if event is not None else None,
                                meta.get("orig_message") or record.getMessage())
        except Exception:  # a display problem must never fail a run
            self.handleError(record)


def logger_def(view: RunProgress) -> dg.LoggerDefinition:
    @dg.logger(description="rag-clean's progress display")
    def rag_clean_progress(_init_context) -> logging.Logger:
        logger = logging.Logger(LOGGER_KEY, level=logging.DEBUG)
        logger.addHandler(_Handler(view))
        return logger

    return rag_clean_progress


def asset_steps(defs: dg.Definitions) -> dict[str, str]:
    """{step key: asset key} of every materializable asset, in graph order (in-process: step = op name)."""
    graph = defs.resolve_asset_graph()
    out = {}
    for key in graph.toposorted_asset_keys:
        node = graph.get(key)
        if node.is_materializable:
            assets_def = node.assets_def
            out[assets_def.node_def.name] = key.to_user_string()
    return out
