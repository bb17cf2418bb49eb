"""Engine tests run stages the way run_stage does, on a plan built from the specs they name.

`plan_of(*specs, **settings)` is the run plan of a registry holding exactly those specs (a test that
changes a spec gets a plan of the changed one); the helpers below call a stage's compute function with
a StageContext under `root` and a StageIO of the target / previous files the test names.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

from rag_clean.config.plan import RetrievalConfig, RunPlan, build_run_plan
from rag_clean.config.registry import ModelSpec, Registry
from rag_clean.config.settings import EmbedderSettings
from rag_clean.stages.context import EmbeddedChunks, StageContext, StageIO
from rag_clean.storage.layout import StorageLayout

# A dense entry that is never loaded: plans need one, sparse-only tests have none.
_NO_DENSE = ModelSpec(name="unused-dense", role="dense", source="path:/nonexistent")


def plan_of(*specs: ModelSpec, fusion: str = "concat", rerank: ModelSpec | None = None, **settings) -> RunPlan:
    models = list(specs) + ([rerank] if rerank is not None else [])
    if not any(s.role == "dense" for s in models):
        models.insert(0, _NO_DENSE)
        settings.setdefault("ensemble_models", (_NO_DENSE.name,))
    if not any(s.role == "sparse" for s in models):
        settings["enable_sparse"] = False
    plan = build_run_plan(Registry(models=tuple(models), fusion_method=fusion), EmbedderSettings(**settings),
                          check_sources=False)  # stand-in specs: some are never loaded
    return dataclasses.replace(plan, rerank=rerank)


def stage_ctx(root: Path, *specs: ModelSpec, collection: str = "c", device="cpu", progress=None,
              token_budget: int | None = None, **settings) -> StageContext:
    return StageContext(collection, plan_of(*specs, **settings), StorageLayout(root), device=device,
                        progress=progress, token_budget=token_budget)


def dense(spec: ModelSpec, chunks, path: Path, previous: Path | None = None, *, root: Path | None = None, **kw):
    from rag_clean.stages.dense import dense_stage

    path = Path(path)
    ctx = stage_ctx(root or path.parent / "_state", spec, **kw)
    return dense_stage(ctx, StageIO(path, previous), spec, chunks)


def sparse(specs: Sequence[ModelSpec], chunks, path: Path | None = None, previous: Path | None = None, *,
           root: Path, **kw):
    from rag_clean.stages.sparse import sparse_stage

    return sparse_stage(stage_ctx(root, *specs, **kw), StageIO(path, previous), chunks)


def fuse(sets: Mapping[str, object], weights: Mapping[str, float], method: str, path: Path, chunks,
         previous: Path | None = None):
    """Fusion of `sets` (by model name) with `weights`; the dense specs are stand-ins (never loaded)."""
    from rag_clean.stages.fusion import fusion_stage

    specs = [ModelSpec(name=n, role="dense", source="path:/nonexistent", weight=weights[n]) for n in sets]
    path = Path(path)
    ctx = stage_ctx(path.parent / "_state", *specs, fusion=method)
    return fusion_stage(ctx, StageIO(path, previous), chunks, {s.asset_name: sets[s.name] for s in specs})


def retrieve(chunks, fused, dense_specs: Sequence[ModelSpec], sparse_table, sparse_specs: Sequence[ModelSpec],
             rerank_spec: ModelSpec | None, config: RetrievalConfig, *, root: Path,
             dense_sets: Mapping[str, object] | None = None, device="cpu", progress=None):
    """The reranked stage with the chunks' heading queries (no collection folder)."""
    from rag_clean.stages.retrieval import reranked_stage

    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    ctx = stage_ctx(root, *dense_specs, *sparse_specs, rerank=rerank_spec, device=device, progress=progress,
                    **settings)
    sets = {s.asset_name: (dense_sets or {}).get(s.name) for s in dense_specs}
    return reranked_stage(ctx, StageIO(None), None, EmbeddedChunks(chunks, fused, sets, sparse_table))
