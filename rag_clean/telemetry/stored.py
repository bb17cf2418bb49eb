"""Stored stage records read back, typed.

The summary is rebuilt from every stage's stored dict (`StageRecord.to_summary()`, written by this or an
earlier process), so the typed record itself is gone by then. The reader of each stored shape lives here,
next to nothing else: summary.py works on these objects, never on a stage dict's keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from rag_clean.telemetry.records import DenseRecord


@dataclass(frozen=True)
class DenseRun:
    """One dense stage as the summary's `dense_run` section reads it: the dict DenseRecord.to_summary() stored,
    typed again (its keys are read here and nowhere else)."""

    model: str | None
    disabled: bool
    asset_key: str | None = None
    rows: int | None = None
    dim: int | None = None
    native_dim: int | None = None
    computed: int | None = None
    reused: int | None = None
    device: str | None = None
    lease: dict | None = None
    duration_s: float | None = None
    run_id: str | None = None
    exclusive: bool = True
    batch_seconds: tuple[float, ...] = ()
    batch_items: tuple[int, ...] = ()
    encode: Mapping = field(default_factory=dict)   # EncodeStats.to_dict()
    truncated: int | None = None   # stored vectors from a truncated text, reused ones included (None: older record)

    @classmethod
    def from_summary(cls, stored: Mapping) -> "DenseRun":
        reuse = stored.get("reuse", {})
        return cls(model=stored.get("model"), disabled=stored.get("status") == "disabled",
                   asset_key=stored.get("asset_key"), rows=stored.get("rows"), dim=stored.get("dim"),
                   native_dim=stored.get("native_dim"), computed=reuse.get("computed"), reused=reuse.get("reused"),
                   device=stored.get("device"), lease=stored.get("lease"), duration_s=stored.get("duration_s"),
                   run_id=stored.get("run_id"), exclusive=stored.get("exclusive", True),
                   batch_seconds=tuple(stored.get("batch_seconds", ())),
                   batch_items=tuple(stored.get("batch_items", ())), encode=stored.get("encode") or {},
                   truncated=(stored.get("truncated_chunks") or {}).get("total"))

    @classmethod
    def all_in(cls, stages: Mapping[str, Mapping]) -> list["DenseRun"]:
        """The dense stages among a summary's stored stage dicts."""
        return [cls.from_summary(v) for v in stages.values() if v.get("stage") == DenseRecord.stage]

    @property
    def truncated_chunks(self) -> int:
        """Stored vectors embedded from a truncated text; a record without that count: those encoded now."""
        return int(self.truncated if self.truncated is not None else (self.encode.get("truncated_inputs", 0) or 0))

    def per_model(self) -> dict:
        """This model's entry of `dense_run.per_model`."""
        enc = self.encode
        return {
            "asset_key": self.asset_key, "rows": self.rows, "dim": self.dim, "native_dim": self.native_dim,
            "computed": self.computed, "reused": self.reused, "device": self.device, "dtype": enc.get("dtype"),
            "tokens": enc.get("tokens"), "tokens_per_second": enc.get("tokens_per_second"),
            "truncated_chunks": self.truncated_chunks, "max_length": enc.get("max_length"),
            "load_seconds": enc.get("load_seconds"),
            "token_budget": {"start": enc.get("token_budget_start"), "final": enc.get("token_budget_final")},
            "oom_mitigations": enc.get("oom_mitigations", []), "lease": self.lease, "duration_s": self.duration_s,
            "run_id": self.run_id,
        }
