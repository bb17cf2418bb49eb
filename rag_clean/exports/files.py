"""The old embedder's export files, written from stored assets (the `exports` stage).

Under `<export_dir>/<collection>/`:

  <collection>_embeddings.npy            fused vectors, float32 (chunks x fused dim), chunk order
  <collection>_<model>_embeddings.npy    one per dense model of the ensemble, float32
  <collection>_qdrant.jsonl              one {"id", "payload", "vectors"} per chunk, chunk order
  <collection>_sparse.jsonl              one {"chunk_id", "model", "indices", "values", "fallback"} per chunk
                                         and sparse model (only when the sparse stage ran)
  <collection>_metadata.json             chunk ids and metadata in row order, models, fusion, file list
  <collection>_stats.json                norms and sparsity per model
  <collection>_processing_summary.json   copy of the telemetry summary

Row i of every matrix is chunk i of the `chunks` table. This module names the files (and removes a
collection's files a run did not write); `write.write_exports` writes them: `npy` (matrices), `jsonl`
(qdrant / sparse lines, copied through the line index of `lines` when unchanged), `metadata`
(metadata, stats, summary copy), from the inputs `inputs` checks and orders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from rag_clean.storage.columns import column
from rag_clean.storage.errors import StorageError
from rag_clean.storage.names import check_name, path_under
# Point ids are the vector index's decision: the export's JSONL points and the synced index's points are the same.
from rag_clean.index.base import POINT_ID_NAMESPACE, point_id  # noqa: F401 (re-exported)

TEXT_PREVIEW_CHARS = 500
EXPORT_BLOCK_ROWS = 4096
FUSED_VECTOR_NAME = "fused"
SPARSE_VECTOR_NAME = "sparse"

FILES_SCHEMA = pa.schema([column("name", pa.string(), "an exported file, relative to the collection's export folder"),
                          column("bytes", pa.int64(), "its size in bytes"),
                          column("sha256", pa.string(), "sha256 hex of its bytes")])

class ExportError(StorageError):
    """Stored assets do not line up (other chunks, other order) or a name cannot become a file name."""


def model_file_part(model: str) -> str:
    """A model name as it appears in a file name ('BAAI/bge-m3' -> 'BAAI_bge-m3')."""
    part = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._")
    if not part:
        raise ExportError(f"model name {model!r} gives an empty file name part")
    return part


@dataclass(frozen=True)
class ExportFiles:
    """Where each export file of one collection goes."""

    folder: Path
    collection: str

    def _f(self, suffix: str) -> Path:
        return self.folder / f"{self.collection}_{suffix}"

    @property
    def fused(self) -> Path:
        return self._f("embeddings.npy")

    def model(self, name: str) -> Path:
        return self._f(f"{model_file_part(name)}_embeddings.npy")

    @property
    def qdrant(self) -> Path:
        return self._f("qdrant.jsonl")

    @property
    def sparse(self) -> Path:
        return self._f("sparse.jsonl")

    @property
    def metadata(self) -> Path:
        return self._f("metadata.json")

    @property
    def stats(self) -> Path:
        return self._f("stats.json")

    @property
    def summary(self) -> Path:
        return self._f("processing_summary.json")


def export_files(export_dir: Path, collection: str) -> ExportFiles:
    return ExportFiles(path_under(Path(export_dir), check_name(collection)), collection)


def remove_stale(files: ExportFiles, keep: set[str]) -> list[str]:
    """Drop export files of this collection that this run did not write (a model left the ensemble,
    sparse was turned off), so the folder never mixes two runs. Only our own file names are touched."""
    removed = []
    own = [f"{files.collection}_sparse.jsonl", f"{files.collection}_processing_summary.json"]
    candidates = [files.folder / n for n in own]
    candidates += [p for p in files.folder.glob(f"{files.collection}_*_embeddings.npy")]
    for path in candidates:
        if path.name not in keep and path.is_file():
            path.unlink()
            removed.append(path.name)
    return sorted(removed)
