"""A block of the sync's writes as one Arrow record batch, and how a block becomes index writes.

The sync (rag_clean.index.sync) decides per chunk row what to write; this module carries that decision in a
form any writer can apply: in this process (`InProcessWriter`) or in a shard writer process
(rag_clean.index.shard_writer), which receives the batch as Arrow IPC bytes. Columns of a block:

    chunk_id, source_file, heading, section_path, chunk_index, content_hash, text, metadata_json  (chunk row)
    _full           bool: write the whole point (else only the stale vectors)
    _payload_fp     uint64: the payload fingerprint (rag_clean.index.sync.payload_digests)
    _stale.<name>   bool per vector name: rewrite this vector (rows with _full false)
    <name>          fixed_size_list<float32> per dense vector name
    <name>.ids / <name>.w   list<int32> / list<float32> per sparse vector name
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from rag_clean.index.base import PAYLOAD_FIELDS, PAYLOAD_KEY, IndexPoint

# The chunks-table columns a point's payload is made of (its "metadata" is parsed from metadata_json).
PAYLOAD_COLUMNS = tuple("metadata_json" if f == "metadata" else f for f in PAYLOAD_FIELDS)


@dataclass(frozen=True)
class BlockSpec:
    """What every block of one sync shares: the current fingerprint per vector name, and which names are
    dense and which sparse (JSON, so a writer process gets it as text)."""

    fingerprints: Mapping[str, str]
    dense: Sequence[str]
    sparse: Sequence[str]

    @property
    def names(self) -> list[str]:
        return [*self.dense, *self.sparse]

    def to_json(self) -> str:
        return json.dumps({"fingerprints": dict(self.fingerprints), "dense": list(self.dense),
                           "sparse": list(self.sparse)})

    @classmethod
    def from_json(cls, text: str) -> "BlockSpec":
        data = json.loads(text)
        return cls(data["fingerprints"], tuple(data["dense"]), tuple(data["sparse"]))


@dataclass
class BlockCounts:
    upserted: int = 0
    rewritten: dict[str, int] = field(default_factory=dict)

    def add(self, other: "BlockCounts") -> None:
        self.upserted += other.upserted
        for name, n in other.rewritten.items():
            self.rewritten[name] = self.rewritten.get(name, 0) + n


def make_block(chunks: pa.Table, rows: np.ndarray, full: np.ndarray, stale: Mapping[str, np.ndarray],
               payload_fp: np.ndarray, dense: Mapping[str, np.ndarray], sparse: Mapping[str, pa.Table]) -> pa.RecordBatch:
    """The block of chunk rows `rows`: `full`, `payload_fp` and each `stale` mask already taken for these rows;
    `dense`: name -> [rows, dim] float32; `sparse`: name -> table of term_ids / weights for these rows."""
    table = chunks.select(list(PAYLOAD_COLUMNS)).take(pa.array(rows))
    columns = {name: table.column(name).combine_chunks() for name in PAYLOAD_COLUMNS}
    columns["_full"] = pa.array(full, pa.bool_())
    columns["_payload_fp"] = pa.array(payload_fp, pa.uint64())
    for name, mask in stale.items():
        columns[f"_stale.{name}"] = pa.array(mask, pa.bool_())
    for name, vectors in dense.items():
        flat = np.ascontiguousarray(vectors, dtype=np.float32)
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    for name, sub in sparse.items():
        columns[f"{name}.ids"] = sub.column("term_ids").combine_chunks()
        columns[f"{name}.w"] = sub.column("weights").combine_chunks()
    return pa.RecordBatch.from_pydict(columns)


def apply_block(index, batch: pa.RecordBatch, spec: BlockSpec) -> BlockCounts:
    """Write one block into `index` (anything with the VectorIndex upsert / update_vectors): whole points for
    `_full` rows, only the stale vectors (and their fingerprints) for the others."""
    counts = BlockCounts()
    full = batch.column("_full").to_numpy(zero_copy_only=False)
    dense = {name: _dense(batch.column(name)) for name in spec.dense}
    sparse = {name: (batch.column(f"{name}.ids").to_pylist(), batch.column(f"{name}.w").to_pylist())
              for name in spec.sparse}
    which = np.flatnonzero(full)
    if len(which):
        payload_fp = batch.column("_payload_fp").to_numpy()
        points = []
        for j, payload in zip(which, _payloads(batch.take(pa.array(which)))):
            fps = {**spec.fingerprints, PAYLOAD_KEY: f"{int(payload_fp[j]):016x}"}
            points.append(IndexPoint(payload["chunk_id"], payload, {name: v[j] for name, v in dense.items()},
                                     {name: (i[j] or [], w[j] or []) for name, (i, w) in sparse.items()}, fps))
        index.upsert(points)
        counts.upserted = len(points)
    partial = np.flatnonzero(~full)
    if len(partial):
        stale = {name: batch.column(f"_stale.{name}").to_numpy(zero_copy_only=False) for name in spec.names}
        ids = batch.column("chunk_id").take(pa.array(partial)).to_pylist()
        points = []
        for j, chunk_id in zip(partial, ids):
            names = [name for name in spec.names if stale[name][j]]
            points.append(IndexPoint(chunk_id, {}, {name: dense[name][j] for name in names if name in dense},
                                     {name: (sparse[name][0][j] or [], sparse[name][1][j] or [])
                                      for name in names if name in sparse},
                                     {name: spec.fingerprints[name] for name in names}))
            for name in names:
                counts.rewritten[name] = counts.rewritten.get(name, 0) + 1
        index.update_vectors(points)
    return counts


def _dense(column: pa.FixedSizeListArray) -> np.ndarray:
    """[rows, dim] float32 over the batch's buffer; each row becomes a list only as its point is converted
    (one block's rows as lists at once would hold ~230 MB of Python floats for 4,096 x 2,304)."""
    return column.flatten().to_numpy().reshape(-1, column.type.list_size)


def _payloads(batch: pa.RecordBatch) -> list[dict]:
    out = []
    for row in batch.select(list(PAYLOAD_COLUMNS)).to_pylist():
        metadata = json.loads(row.pop("metadata_json") or "{}")
        out.append({**row, "metadata": metadata})
    return out


class InProcessWriter:
    """Applies the sync's writes to the index in this process (a server sink, or a small write)."""

    def __init__(self, index, spec: BlockSpec):
        self.index, self.spec, self.counts = index, spec, BlockCounts()

    def delete(self, chunk_ids: Sequence[str]) -> None:
        self.index.delete(chunk_ids)

    def write(self, batch: pa.RecordBatch) -> None:
        self.counts.add(apply_block(self.index, batch, self.spec))

    def commit(self) -> BlockCounts:
        self.index.commit()
        return self.counts

    def close(self) -> None:
        pass
