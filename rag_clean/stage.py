"""What an asset hands to the storage layer: the value (or a staged file) plus its stage record."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from rag_clean.storage import EmbeddingWriter, TableWriter
from rag_clean.telemetry import utc_now


@dataclass
class StageOutput:
    """`value` is a table (written as Parquet), a staged writer (EmbeddingWriter: Arrow IPC;
    TableWriter: Parquet) that the IO manager publishes by rename, or None when the stage is disabled:
    then nothing is written and the previous file stays."""

    value: pa.Table | EmbeddingWriter | TableWriter | None
    record: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def disabled(self) -> bool:
        return self.value is None


class StageTimer:
    """Measures a stage's wall time and stamps start/end on its record."""

    def __init__(self) -> None:
        self.started_at = utc_now()
        self._t0 = time.perf_counter()

    def stamp(self, record: dict[str, Any]) -> dict[str, Any]:
        record.setdefault("started_at", self.started_at)
        record["duration_s"] = round(time.perf_counter() - self._t0, 6)
        return record
