"""The run plan: which models a run uses and with which settings, decided once.

`build_run_plan(registry, settings)` turns the registry and the resolved settings into one immutable
`RunPlan`; every stage (and the CLI) reads its choices from it instead of re-deriving them. Unknown
or wrong-role model names fail here, with the setting's provenance, before any stage runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping, Sequence

from rag_clean.config.declaration import BY_KEY
from rag_clean.config.models import ModelResolver, ModelSourceError
from rag_clean.config.registry import ModelSpec, Registry, RegistryError
from rag_clean.config.settings import EmbedderSettings


class PlanError(ValueError):
    """The settings name models the registry does not have (or of the wrong role)."""


def _default(key: str):
    return BY_KEY[key].default


@dataclass(frozen=True)
class RetrievalConfig:
    """The retrieval stage's typed view of the run settings; the defaults are the declaration's
    (rag_clean.config.declaration), and build_run_plan fills every field from the resolved settings."""

    top_k_candidates: int = _default("top_k_candidates")
    rerank_top_k: int = _default("rerank_top_k")
    rrf_k: int = _default("rrf_k")
    rerank_batch_size: int = _default("rerank_batch_size")
    enable_sparse: bool = _default("enable_sparse")
    enable_rerank: bool = _default("enable_rerank")
    hybrid_fusion: str = _default("hybrid_fusion")
    score_normalization: str = _default("score_normalization")
    hybrid_dense_weight: float = _default("hybrid_dense_weight")
    tune_min_queries: int = _default("tune_min_queries")
    tune_fraction: float = _default("tune_fraction")
    tune_ensemble_weights: bool = _default("tune_ensemble_weights")


@dataclass(frozen=True)
class JointPlan:
    """What a bge-m3 dense model's forward pass yields besides its dense vectors."""

    sparse_spec: ModelSpec | None = None   # sparse partner whose lexical rows come from the same pass
    colbert: bool = False                  # store ColBERT multi-vectors of the pass

    @property
    def active(self) -> bool:
        return self.sparse_spec is not None or self.colbert


@dataclass(frozen=True)
class RayPlan:
    """Where and how the dense and sparse stages encode data-parallel (see rag_clean.distributed)."""

    address: str            # "local", "auto", "ray://host:port" or "host:port"
    shard_rows: int = 4096  # rows per shard: the unit an actor encodes and Ray retries
    actors: int = 2         # actors, one model load each


@dataclass(frozen=True)
class RunPlan:
    registry: Registry
    settings: EmbedderSettings
    dense: tuple[ModelSpec, ...]                  # the ensemble, fused in this order
    sparse: tuple[ModelSpec, ...]                 # empty when sparse is disabled
    rerank: ModelSpec | None
    fusion_method: str
    retrieval: RetrievalConfig
    query_text_mode: str
    reuse_unchanged: bool
    exports_enabled: bool
    export_dir: str
    fusion_weights: Mapping[str, float] = field(default_factory=dict)
    ray: RayPlan | None = None                    # None: encode in-process (the default)
    # Each model's source, folder and fingerprint, resolved on first use and kept for the run.
    models: ModelResolver = field(default_factory=ModelResolver, compare=False)
    # bge-m3 partners, decided once (Registry.joint_sparse_partner): sparse model name -> the dense entry
    # whose forward pass also yields its rows.
    sparse_partners: Mapping[str, ModelSpec] = field(default_factory=dict)

    # -- per-stage questions -------------------------------------------------------------------

    @property
    def sparse_enabled(self) -> bool:
        return self.retrieval.enable_sparse

    def dense_spec(self, name: str) -> ModelSpec:
        return self.registry.get(name)

    def dense_disabled_reason(self, spec: ModelSpec) -> str | None:
        """Why a dense registry model does not run in this plan (None: it runs)."""
        if any(s.name == spec.name for s in self.dense):
            return None
        return (f"{spec.name} is not in ensemble_models={list(self.settings.ensemble_models)} "
                f"({self.provenance('ensemble_models')}); nothing written, the previous file stays")

    def sparse_disabled_reason(self) -> str | None:
        if self.sparse_enabled:
            return None
        return f"sparse stage disabled: enable_sparse=false ({self.provenance('enable_sparse')})"

    def exports_disabled_reason(self) -> str | None:
        if self.exports_enabled:
            return None
        return f"exports disabled: enable_exports=false ({self.provenance('enable_exports')})"

    def index_disabled_reason(self) -> str | None:
        if self.settings.index_sink != "off":
            return None
        return f"vector index disabled: index_sink=off ({self.provenance('index_sink')})"

    def joint(self, dense_spec: ModelSpec) -> JointPlan:
        """Side outputs of `dense_spec`'s pass: lexical rows when it is the bge-m3 partner of a sparse model
        that runs in this plan, ColBERT vectors when the entry says `colbert = true`."""
        partner = next((s for s in self.sparse if self.sparse_partners.get(s.name) == dense_spec), None)
        return JointPlan(sparse_spec=partner, colbert=bool(dense_spec.colbert))

    def joint_dense_partner(self, sparse_spec: ModelSpec) -> ModelSpec | None:
        """The dense entry whose forward pass may already have written `sparse_spec`'s rows (its side file)."""
        return self.sparse_partners.get(sparse_spec.name)

    def provenance(self, key: str) -> str:
        return self.settings.provenance.get(key, "default")

    def toggles(self) -> dict:
        """The settings and where each came from, as every stage record carries them."""
        return {"toggles": self.settings.as_dict(), "provenance": dict(self.settings.provenance)}


def _select(registry: Registry, names: Sequence[str], role: str, key: str, settings: EmbedderSettings) -> tuple[ModelSpec, ...]:
    if not names:
        return tuple(registry.by_role(role))
    chosen, unknown, wrong = [], [], []
    for name in names:
        try:
            spec = registry.get(name)
        except RegistryError:
            unknown.append(name)
            continue
        (chosen if spec.role == role else wrong).append(spec)
    if unknown or wrong:
        known = [m.name for m in registry.by_role(role)]
        bad = unknown + [s.name for s in wrong]
        raise PlanError(f"{key} ({settings.provenance.get(key, 'default')}): {bad} are not {role} models of the "
                        f"registry {registry.path}; known {role} models: {known}")
    return tuple(dict.fromkeys(chosen))


def _sparse_partners(registry: Registry) -> dict[str, ModelSpec]:
    partners: dict[str, ModelSpec] = {}
    for dense in registry.dense:
        sparse = registry.joint_sparse_partner(dense)
        if sparse is not None:
            partners.setdefault(sparse.name, dense)  # the first dense partner in registry order
    return partners


def source_problem(models: ModelResolver, spec: ModelSpec) -> str | None:
    """Why none of `spec`'s sources (primary, then fallbacks) resolves to a local model folder (offline),
    or None when one does. Cheap: paths, installed packages and the local hub cache, nothing loaded."""
    try:
        models.get(spec).require_folder()
        return None
    except ModelSourceError as exc:
        return f"model {spec.name} ({spec.role}): " + str(exc).removeprefix(f"model {spec.name}: ")


def build_run_plan(registry: Registry, settings: EmbedderSettings, digest_cache: Path | None = None, *,
                   check_sources: bool = True) -> RunPlan:
    """The plan of one run. Every dense and sparse model it runs must have a source that resolves locally,
    so a missing folder fails here, before the first step writes anything. The reranker is exempt: when
    none of its sources loads, `reranked` keeps retrieval order (documented). `digest_cache`: where model
    file digests are kept across runs (StorageLayout.weights_digest_file); None: the configured storage
    root's, if any. `check_sources=False`: no source check (plans of stand-in specs that are never loaded)."""
    dense = _select(registry, settings.ensemble_models, "dense", "ensemble_models", settings)
    if not dense:
        raise PlanError(f"the registry {registry.path} names no dense model")
    sparse = _select(registry, settings.sparse_models, "sparse", "sparse_models", settings) if settings.enable_sparse else ()
    if settings.enable_sparse and not sparse:
        raise PlanError("sparse is enabled but the registry names no sparse model; add one or set EMBEDDER_ENABLE_SPARSE=0")
    retrieval = RetrievalConfig(**{f.name: getattr(settings, f.name) for f in fields(RetrievalConfig)})
    models = ModelResolver(digest_cache)
    problems = [p for p in (source_problem(models, spec) for spec in (*dense, *sparse)) if p] if check_sources else []
    if problems:
        raise PlanError("\n".join(problems))
    return RunPlan(
        registry=registry, settings=settings, dense=dense, sparse=sparse, rerank=registry.rerank,
        fusion_method=settings.fusion_method or registry.fusion_method, retrieval=retrieval,
        query_text_mode=settings.query_text_mode, reuse_unchanged=settings.reuse_unchanged,
        exports_enabled=settings.enable_exports, export_dir=settings.export_dir,
        fusion_weights={s.name: s.weight for s in dense},
        ray=RayPlan(address=settings.ray_address, shard_rows=settings.ray_shard_rows, actors=settings.ray_actors)
        if settings.ray_address else None,
        models=models, sparse_partners=_sparse_partners(registry),
    )
