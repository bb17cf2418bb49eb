"""Pieces every stage uses: what a stage hands to storage (StageOutput), its timer, the model fingerprint."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TypeVar

import pyarrow as pa

from rag_clean.records import StageRecord
from rag_clean.registry import ModelSpec
from rag_clean.storage import EmbeddingWriter, TableWriter
from rag_clean.telemetry import utc_now

log = logging.getLogger(__name__)


ROW_BLOCK = 65536
R = TypeVar("R", bound=StageRecord)


def model_fingerprint(spec: ModelSpec) -> str:
    """What must match for stored vectors of an unchanged chunk to be reused."""
    return json.dumps({"backend": spec.backend, "source": spec.source, "pooling": spec.pooling,
                       "max_length": spec.max_length, "dim": spec.dim, "truncate_dim": spec.truncate_dim},
                      sort_keys=True)


@dataclass
class StageOutput:
    """`value` is a table (written as Parquet, or Arrow IPC where the layout says .arrow), a staged writer
    (EmbeddingWriter / ColumnSpool: Arrow IPC; TableWriter: Parquet) that the IO manager publishes by rename, or None when the stage is disabled:
    then nothing is written and the previous file stays."""

    value: "pa.Table | EmbeddingWriter | TableWriter | ColumnSpool | None"
    record: StageRecord

    @property
    def disabled(self) -> bool:
        return self.value is None


class StageTimer:
    """Measures a stage's wall time and stamps start/end on its record."""

    def __init__(self) -> None:
        self.started_at = utc_now()
        self._t0 = time.perf_counter()

    def stamp(self, record: R) -> R:
        record.started_at = record.started_at or self.started_at
        record.duration_s = round(time.perf_counter() - self._t0, 6)
        return record
