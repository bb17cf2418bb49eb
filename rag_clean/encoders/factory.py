"""Pick and load an encoder backend for a ModelSpec, offline.

Every load resolves the registry entry to a local folder first: its first candidate source (primary,
then fallbacks) that resolves offline, as rag_clean.config.models.ResolvedModel decides (the run plan's
resolution when the caller passes it, so the load uses the folder the fingerprint hashed). A `package:` /
`path:` source or an existing folder is used as is; a hub id must already be in the local Hugging Face
cache (looked up with local_files_only, so a missing model fails at once with a clear error and never
waits on the network).
"""

from __future__ import annotations

import importlib
import os

from rag_clean.encoders.base import DenseEncoder, EncoderError, Reranker, SparseEncoder
from rag_clean.encoders.budget import BudgetStore
from rag_clean.config.models import ModelSourceError, ResolvedModel, resolve_folder
from rag_clean.config.registry import ModelSpec

# Models are never fetched at run time; set before huggingface_hub is imported where possible.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Read by huggingface_hub (and through it transformers) at their first import.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def quiet_third_party_progress() -> None:
    """Switch off transformers' "Loading weights" bars and huggingface_hub's bars, also when either was imported
    before the environment said so (a benchmark, a test, a notebook): every model load passes here, and the
    run's own progress lines (rag_clean.telemetry.progress) are what a person reads. Their bars write to
    stderr and would land in rag-clean's display, the main job's output and Dagster's step logs."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()


class ModelLoadError(EncoderError):
    """No source of a model could be loaded; the message names the model and each failure."""


def resolve_local_source(spec: ModelSpec, source: str) -> str:
    """Registry source -> local folder, without touching the network (rag_clean.config.models)."""
    try:
        return resolve_folder(spec, source)
    except ModelSourceError as exc:
        raise ModelLoadError(str(exc)) from exc


def _resolved(spec: ModelSpec, model: ResolvedModel | None) -> tuple[str, str]:
    """(folder, source) to load: the run plan's resolution when given, else resolved now; the first
    candidate source that resolves locally, as the fingerprint and the FlagEmbedding loaders take it."""
    model = model if model is not None else ResolvedModel.resolve(spec)
    try:
        return model.require_folder(), model.source
    except ModelSourceError as exc:
        raise ModelLoadError(str(exc)) from exc


def _note_fallback(encoder, spec: ModelSpec, source: str, model: ResolvedModel | None):
    """Record on the encoder's stats that a fallback source was loaded (as the reranker does)."""
    if source != spec.source and getattr(encoder, "stats", None) is not None:
        reason = (model.attempts[0][1] if model is not None and model.attempts else f"{spec.source} does not resolve")
        encoder.stats.fallback = {"applied": True, "reason": reason, "source": source}
    return encoder


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
                       token_budget: int | None = None, model: ResolvedModel | None = None) -> DenseEncoder:
    """Dense encoder for `spec`; `device` may name several GPUs ('cuda:0,cuda:1'): one replica each.
    `model`: the run plan's resolution of `spec` (RunPlan.models), so the load uses the folder the
    fingerprint hashed."""
    _check_role(spec, "dense")
    quiet_third_party_progress()
    if spec.backend == "flagembedding":
        return _flag_module(spec).flag_dense_encoder(spec, device, budget_store=budget_store, token_budget=token_budget)
    from rag_clean.encoders.st_dense import STDenseEncoder

    path, source = _resolved(spec, model)
    return _note_fallback(_loaded(spec, path, lambda: STDenseEncoder(spec, device, source=path, budget_store=budget_store,
                                                                     token_budget=token_budget)), spec, source, model)


def load_sparse_encoder(spec: ModelSpec, device: str | list[str] = "cpu", *,
                        budget_store: BudgetStore | None = None, token_budget: int | None = None,
                        model: ResolvedModel | None = None) -> SparseEncoder:
    _check_role(spec, "sparse")
    quiet_third_party_progress()
    if spec.backend == "flagembedding":
        return _flag_module(spec).flag_sparse_encoder(spec, device, budget_store=budget_store, token_budget=token_budget)
    from rag_clean.encoders.st_sparse import STSparseEncoder

    path, source = _resolved(spec, model)
    return _note_fallback(_loaded(spec, path, lambda: STSparseEncoder(spec, device, source=path, budget_store=budget_store,
                                                                      token_budget=token_budget)), spec, source, model)


def load_reranker(spec: ModelSpec, device: str | list[str] = "cpu", *, budget_store: BudgetStore | None = None,
                  token_budget: int | None = None, max_batch_pairs: int | None = None) -> tuple[Reranker | None, dict]:
    """First loadable of spec.source, then spec.fallbacks in order, plus a record of what happened.

    `max_batch_pairs` caps the pairs per forward on top of the token budget (rerank_batch_size).
    Returns (None, record) when none loads: the caller decides whether reranking is optional.
    """
    _check_role(spec, "rerank")
    quiet_third_party_progress()
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
