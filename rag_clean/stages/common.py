"""Pieces every stage uses: what a stage hands to storage (StageOutput), its timer, the model fingerprint."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pyarrow as pa

from rag_clean.telemetry.records import StageRecord
from rag_clean.config.registry import ModelSpec
from rag_clean.storage.digests import DigestCache
from rag_clean.storage.embeddings import EmbeddingWriter
from rag_clean.storage.parquet import TableWriter
from rag_clean.telemetry.summary import utc_now

log = logging.getLogger(__name__)


ROW_BLOCK = 65536
R = TypeVar("R", bound=StageRecord)


# The code version of each encoder backend's output: bump one when a change of its code changes the
# vectors or term weights it produces (then every stored row of its models is recomputed).
ENCODER_CODE_VERSIONS = {"sentence-transformers": "1", "flagembedding": "1"}

# Files of a model folder that do not change what it computes.
_NOT_MODEL_FILES = (".md", ".lock", ".gitattributes", ".metadata")


def encoder_code_version(spec: ModelSpec) -> str:
    return ENCODER_CODE_VERSIONS.get(spec.backend, "1")


def _model_folder(spec: ModelSpec) -> Path | None:
    """The folder a load would use: the first source that resolves locally (offline), else None."""
    from rag_clean.encoders.factory import resolve_local_source

    for source in spec.candidate_sources():
        try:
            return Path(resolve_local_source(spec, source))
        except Exception:  # not local: the next fallback, as the loader does
            continue
    return None


_DIGESTS: dict[str, list] = {}  # file path -> [size, mtime_ns, sha256], this process's memo


def weights_digest(spec: ModelSpec, cache_file: Path | None = None) -> str:
    """sha256 over the model folder's files (weights, configs, tokenizer), each file's digest cached by
    (path, size, mtime_ns) in this process and in `cache_file`, so a run does not re-hash GBs.

    A source that is not local (a hub id absent from the cache) digests as "unresolved": the model
    cannot load then, and its fingerprint still names the source.
    """
    folder = _model_folder(spec)
    if folder is None:
        return "unresolved"
    if cache_file is None:  # callers without a layout still share the configured storage root's cache
        cache_file = default_digest_cache()
    digests = DigestCache(cache_file, memo=_DIGESTS)
    overall = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in path.relative_to(folder).parts) or rel.endswith(_NOT_MODEL_FILES):
            continue
        overall.update(f"{rel}\0{digests.digest(str(path.resolve()), path)}\n".encode())
    digests.save()
    return overall.hexdigest()


def model_fingerprint(spec: ModelSpec, cache_file: Path | None = None) -> str:
    """What must match for stored vectors of an unchanged chunk to be reused: the weights (digest of
    the model folder), how they are run (pooling, max_length, dtype, truncate_dim, flag_class) and the
    encoder's code version. `cache_file` (StorageLayout.weights_digest_file) keeps file digests across runs."""
    return json.dumps({"backend": spec.backend, "source": spec.source, "weights": weights_digest(spec, cache_file),
                       "pooling": spec.pooling, "max_length": spec.max_length, "dtype": spec.dtype, "dim": spec.dim,
                       "truncate_dim": spec.truncate_dim, "flag_class": spec.flag_class,
                       "code": encoder_code_version(spec)}, sort_keys=True)


def sparse_fingerprint(spec: ModelSpec, cache_file: Path | None = None) -> str:
    """What must match for stored term weights to stand for `spec`'s output: the model fingerprint plus
    the pruning (top_k)."""
    return json.dumps({"model": json.loads(model_fingerprint(spec, cache_file)), "top_k": spec.top_k},
                      sort_keys=True)


def default_digest_cache() -> Path | None:
    """The weights digest cache under the configured storage root, or None when no root is configured
    (then digests are cached in this process only, and nothing is written under the project)."""
    import os

    from rag_clean.config.paths import storage_root
    from rag_clean.config.settings import process_setting
    from rag_clean.storage.layout import StorageLayout

    if not (process_setting("storage_root") or os.environ.get("DAGSTER_HOME")):
        return None
    return StorageLayout(storage_root()).weights_digest_file()


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
