"""Models resolved once: a registry entry, the source that resolves locally, its folder and fingerprint.

`ModelResolver.get(spec)` (one per run plan, `RunPlan.models`) resolves a spec the first time it is
asked and keeps the answer, so the fingerprints, the loaders and the stages of one run agree on which
folder a model comes from (its first candidate source that resolves offline: the primary, then each
fallback) and hash its weights at most once.

Code versions come from `declared_identity` (what the registry declares), never from the weight files:
building the asset graph reads no weight file (the chunks code version reads the packing tokenizer's
files: rag_clean.encoders.chunk_tokens).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from rag_clean.config.registry import ModelSpec, RegistryError
from rag_clean.storage.digests import DigestCache

# The code version of each encoder backend's output: bump one when a change of its code changes the
# vectors or term weights it produces (then every stored row of its models is recomputed).
ENCODER_CODE_VERSIONS = {"sentence-transformers": "1", "flagembedding": "1"}

# Files of a model folder that do not change what it computes.
_NOT_MODEL_FILES = (".md", ".lock", ".gitattributes", ".metadata")

_DIGESTS: dict[str, list] = {}  # file path -> [size, mtime_ns, sha256], this process's memo


class ModelSourceError(RegistryError):
    """A registry source does not resolve to a local model folder (loading is offline)."""


def encoder_code_version(spec: ModelSpec) -> str:
    return ENCODER_CODE_VERSIONS.get(spec.backend, "1")


def resolve_folder(spec: ModelSpec, source: str) -> str:
    """Registry source -> local folder, without touching the network (ModelSourceError if none)."""
    # A fallback source is not the model the registry entry is named after: say whose fallback it is.
    who = f"model {spec.name}" if source == spec.source else f"fallback of model {spec.name}"
    try:
        resolved = spec.resolve_source(source)
    except RegistryError as exc:
        raise ModelSourceError(f"{who}: {exc}") from exc
    if Path(resolved).is_dir():
        return resolved
    if Path(resolved).exists():
        raise ModelSourceError(f"{who}: source {source!r} -> {resolved} is a file, expected a model folder")
    if source.startswith(("path:", "package:")) or resolved.startswith(("/", ".", "~")):
        raise ModelSourceError(f"{who}: source {source!r} -> {resolved} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=resolved, local_files_only=True)
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, ...
        raise ModelSourceError(
            f"{who}: source {source!r} is not a local folder and is not in the local Hugging Face "
            f"cache (loading is offline): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def declared_identity(spec: ModelSpec) -> dict:
    """What the registry declares about how a model computes (no weight file is read): every field of
    the fingerprint but the weights digest, plus the fallback sources."""
    return {"backend": spec.backend, "source": spec.source, "fallbacks": list(spec.fallbacks),
            "pooling": spec.pooling, "max_length": spec.max_length, "dtype": spec.dtype, "dim": spec.dim,
            "truncate_dim": spec.truncate_dim, "flag_class": spec.flag_class, "top_k": spec.top_k,
            "query_instruction": spec.query_instruction, "code": encoder_code_version(spec)}


def default_digest_cache() -> Path | None:
    """The weights digest cache under the configured storage root, or None when no root is configured
    (then digests are cached in this process only, and nothing is written under the project)."""
    from rag_clean.config.paths import storage_root
    from rag_clean.config.settings import process_setting
    from rag_clean.storage.layout import StorageLayout

    if not (process_setting("storage_root") or os.environ.get("DAGSTER_HOME")):
        return None
    return StorageLayout(storage_root()).weights_digest_file()


@dataclass(frozen=True)
class ResolvedModel:
    """One registry entry as a run uses it. `source` / `folder`: the first candidate source that resolves
    locally (None when none does: the model cannot load, and its fingerprint still names the source);
    `attempts`: (source, error) of each candidate tried before it."""

    spec: ModelSpec
    source: str | None
    folder: Path | None
    attempts: tuple[tuple[str, str], ...] = ()
    digest_cache: Path | None = field(default=None, compare=False)

    @classmethod
    def resolve(cls, spec: ModelSpec, digest_cache: Path | None = None) -> "ResolvedModel":
        attempts = []
        for source in spec.candidate_sources():
            try:
                return cls(spec, source, Path(resolve_folder(spec, source)), tuple(attempts), digest_cache)
            except ModelSourceError as exc:  # not local: the next fallback, as every loader does
                attempts.append((source, str(exc)))
        return cls(spec, None, None, tuple(attempts), digest_cache)

    @property
    def fallback_applied(self) -> bool:
        return self.source is not None and self.source != self.spec.source

    def require_folder(self) -> str:
        """The folder to load, or the error of every candidate source tried."""
        if self.folder is None:
            raise ModelSourceError(self.attempts[0][1] if len(self.attempts) == 1 else
                                   f"model {self.spec.name}: no source resolves locally ("
                                   + " | ".join(error for _, error in self.attempts) + ")")
        return str(self.folder)

    @cached_property
    def weights_digest(self) -> str:
        """sha256 over the model folder's files (weights, configs, tokenizer), each file's digest cached by
        (path, size, mtime_ns) in this process and in `digest_cache`, so a run does not re-hash GBs."""
        if self.folder is None:
            return "unresolved"
        cache_file = self.digest_cache if self.digest_cache is not None else default_digest_cache()
        digests = DigestCache(cache_file, memo=_DIGESTS)
        overall = hashlib.sha256()
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file()):
            rel = path.relative_to(self.folder)
            if any(part.startswith(".") for part in rel.parts) or rel.as_posix().endswith(_NOT_MODEL_FILES):
                continue
            overall.update(f"{rel.as_posix()}\0{digests.digest(str(path.resolve()), path)}\n".encode())
        digests.save()
        return overall.hexdigest()

    @cached_property
    def fingerprint(self) -> str:
        """What must match for stored vectors of an unchanged chunk to be reused: the weights (digest of
        the model folder), how they are run (pooling, max_length, dtype, truncate_dim, flag_class) and the
        encoder's code version."""
        spec = self.spec
        return json.dumps({"backend": spec.backend, "source": spec.source, "weights": self.weights_digest,
                           "pooling": spec.pooling, "max_length": spec.max_length, "dtype": spec.dtype,
                           "dim": spec.dim, "truncate_dim": spec.truncate_dim, "flag_class": spec.flag_class,
                           "code": encoder_code_version(spec)}, sort_keys=True)

    @property
    def sparse_fingerprint(self) -> str:
        """The model fingerprint plus the pruning (top_k): what stored term weights stand for."""
        return json.dumps({"model": json.loads(self.fingerprint), "top_k": self.spec.top_k}, sort_keys=True)


class ModelResolver:
    """ResolvedModel per spec, each resolved on first use and kept (one resolver per run plan)."""

    def __init__(self, digest_cache: Path | None = None):
        self.digest_cache = digest_cache
        self._resolved: dict[ModelSpec, ResolvedModel] = {}
        self._lock = threading.Lock()

    def get(self, spec: ModelSpec) -> ResolvedModel:
        with self._lock:
            model = self._resolved.get(spec)
            if model is None or model.spec.registry_dir != spec.registry_dir:
                model = self._resolved[spec] = ResolvedModel.resolve(spec, self.digest_cache)
            return model


def model_fingerprint(spec: ModelSpec, cache_file: Path | None = None) -> str:
    """A spec's fingerprint, resolved now (callers without a run plan: tests, benchmarks)."""
    return ResolvedModel.resolve(spec, cache_file).fingerprint


def sparse_fingerprint(spec: ModelSpec, cache_file: Path | None = None) -> str:
    return ResolvedModel.resolve(spec, cache_file).sparse_fingerprint
