"""Pick and load an encoder backend for a ModelSpec, offline.

Every load resolves the registry `source` to a local folder first: a `package:` / `path:` source
or an existing folder is used as is; a hub id must already be in the local Hugging Face cache
(looked up with local_files_only, so a missing model fails at once with a clear error and never
waits on the network).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from rag_clean.encoders.base import DenseEncoder, EncoderError, Reranker, SparseEncoder
from rag_clean.encoders.budget import BudgetStore
from rag_clean.config.registry import ModelSpec, RegistryError

# Models are never fetched at run time; set before huggingface_hub is imported where possible.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ModelLoadError(EncoderError):
    """No source of a model could be loaded; the message names the model and each failure."""


def resolve_local_source(spec: ModelSpec, source: str) -> str:
    """Registry source -> local folder, without touching the network."""
    try:
        resolved = spec.resolve_source(source)
    except RegistryError as exc:
        raise ModelLoadError(f"model {spec.name}: {exc}") from exc
    if Path(resolved).is_dir():
        return resolved
    if Path(resolved).exists():
        raise ModelLoadError(f"model {spec.name}: source {source!r} -> {resolved} is a file, expected a model folder")
    if source.startswith(("path:", "package:")) or resolved.startswith(("/", ".", "~")):
        raise ModelLoadError(f"model {spec.name}: source {source!r} -> {resolved} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=resolved, local_files_only=True)
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, ...
        raise ModelLoadError(
            f"model {spec.name}: source {source!r} is not a local folder and is not in the local Hugging Face "
            f"cache (loading is offline): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def _flag_module(spec: ModelSpec):
    try:
        return importlib.import_module("rag_clean.encoders.flag")
    except ModuleNotFoundError as exc:
        if exc.name in ("rag_clean.encoders.flag",):
            raise NotImplementedError(
                f"model {spec.name}: backend 'flagembedding' is not available yet (rag_clean.encoders.flag is missing)"
            ) from exc
        raise


def _loaded(spec: ModelSpec, source: str, build):
    """`build()`, with a failure to read the model's files (a truncated model.safetensors, a bad
    config.json) turned into one line naming the model, its folder and the problem."""
    try:
        return build()
    except (EncoderError, NotImplementedError):
        raise
    except Exception as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise ModelLoadError(f"model {spec.name}: cannot load {source}: {type(exc).__name__}: {first} "
                             "(a truncated or corrupt weights file? re-install or re-download the model)") from exc


def _check_role(spec: ModelSpec, role: str) -> None:
    if spec.role != role:
        raise EncoderError(f"model {spec.name} has role {spec.role!r}; this loader needs role {role!r}")


def load_dense_encoder(spec: ModelSpec, device: str | list[str] = "cpu", *, budget_store: BudgetStore | None = None,
                       token_budget: int | None = None) -> DenseEncoder:
    """Dense encoder for `spec`; `device` may name several GPUs ('cuda:0,cuda:1'): one replica each."""
    _check_role(spec, "dense")
    if spec.backend == "flagembedding":
        return _flag_module(spec).flag_dense_encoder(spec, device, budget_store=budget_store, token_budget=token_budget)
    from rag_clean.encoders.st_dense import STDenseEncoder

    path = resolve_local_source(spec, spec.source)
    return _loaded(spec, path, lambda: STDenseEncoder(spec, device, source=path, budget_store=budget_store,
                                                      token_budget=token_budget))


def load_sparse_encoder(spec: ModelSpec, device: str | list[str] = "cpu", *,
                        budget_store: BudgetStore | None = None, token_budget: int | None = None) -> SparseEncoder:
    _check_role(spec, "sparse")
    if spec.backend == "flagembedding":
        return _flag_module(spec).flag_sparse_encoder(spec, device, budget_store=budget_store, token_budget=token_budget)
    from rag_clean.encoders.st_sparse import STSparseEncoder

    path = resolve_local_source(spec, spec.source)
    return _loaded(spec, path, lambda: STSparseEncoder(spec, device, source=path, budget_store=budget_store,
                                                       token_budget=token_budget))


def load_reranker(spec: ModelSpec, device: str | list[str] = "cpu", *, budget_store: BudgetStore | None = None,
                  token_budget: int | None = None, max_batch_pairs: int | None = None) -> tuple[Reranker | None, dict]:
    """First loadable of spec.source, then spec.fallbacks in order, plus a record of what happened.

    `max_batch_pairs` caps the pairs per forward on top of the token budget (rerank_batch_size).
    Returns (None, record) when none loads: the caller decides whether reranking is optional.
    """
    _check_role(spec, "rerank")
    record: dict = {"requested": spec.source, "resolved": None, "attempts": [], "fallback_applied": False,
                    "reason": None}
    for source in spec.candidate_sources():
        try:
            if spec.backend == "flagembedding":
                reranker = _flag_module(spec).FlagRerankerAdapter(_with_source(spec, source), device,
                                                                  budget_store=budget_store, token_budget=token_budget)
            else:
                from rag_clean.encoders.st_rerank import STCrossEncoderReranker

                path = resolve_local_source(spec, source)
                reranker = STCrossEncoderReranker(spec, device, source=path, budget_store=budget_store,
                                                  token_budget=token_budget, source_label=source)
        except NotImplementedError:
            raise
        except Exception as exc:
            record["attempts"].append({"source": source, "error": f"{type(exc).__name__}: {exc}"})
            continue
        record["resolved"] = source
        if max_batch_pairs:
            reranker.runner.max_batch_items = max_batch_pairs
        if source != spec.source:
            record["fallback_applied"] = True
            record["reason"] = f"{spec.source} could not be loaded: {record['attempts'][0]['error']}"
        if getattr(reranker, "stats", None) is not None:
            reranker.stats.fallback = {"applied": record["fallback_applied"], "reason": record["reason"],
                                       "source": source}
        return reranker, record
    record["reason"] = "no source could be loaded: " + "; ".join(f"{a['source']}: {a['error']}" for a in record["attempts"])
    return None, record


def _with_source(spec: ModelSpec, source: str) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, source=source)
