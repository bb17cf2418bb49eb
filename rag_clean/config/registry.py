"""Model registry: one TOML file naming every model, its role, backend, source and shape."""

from __future__ import annotations

import importlib
import importlib.util
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from rag_clean.config.declaration import BY_KEY
from rag_clean.config.settings import process_setting
from rag_clean.config.registry_schema import RegistryFile, render_errors

REGISTRY_ENV = BY_KEY["model_registry"].env
DEFAULT_REGISTRY_PATH = Path(__file__).resolve().parents[1] / "models.toml"



class RegistryError(ValueError):
    """The registry file is malformed or names a model that cannot be resolved."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    role: str
    source: str
    backend: str = "sentence-transformers"
    dim: int | None = None
    pooling: str = "mean"
    max_length: int = 256
    dtype: str = "auto"
    weight: float = 1.0
    # Matryoshka: keep the first `truncate_dim` components, then renormalize. Never pads.
    truncate_dim: int | None = None
    # Sparse: keep the top-k terms per chunk.
    top_k: int = 256
    # FlagEmbedding BGEM3FlagModel: also produce lexical (sparse) / ColBERT outputs in the same pass.
    flag_class: str | None = None
    # bge-m3 dense entries only: also store ColBERT multi-vectors from the same forward pass.
    colbert: bool = False
    fallbacks: tuple[str, ...] = ()
    query_instruction: str | None = None
    registry_dir: Path = field(default=DEFAULT_REGISTRY_PATH.parent, compare=False, repr=False)

    @property
    def output_dim(self) -> int | None:
        return self.truncate_dim or self.dim

    @property
    def asset_name(self) -> str:
        """Dagster-safe identifier derived from the model name."""
        return "".join(c if c.isalnum() else "_" for c in self.name.lower()).strip("_")

    def candidate_sources(self) -> list[str]:
        return [self.source, *self.fallbacks]

    def resolve_source(self, source: str | None = None) -> str:
        return resolve_source(source or self.source, self.registry_dir)


@dataclass(frozen=True)
class Registry:
    models: tuple[ModelSpec, ...]
    fusion_method: str = "concat"
    path: Path | None = None

    def by_role(self, role: str) -> list[ModelSpec]:
        return [m for m in self.models if m.role == role]

    @property
    def dense(self) -> list[ModelSpec]:
        return self.by_role("dense")

    @property
    def sparse(self) -> list[ModelSpec]:
        return self.by_role("sparse")

    @property
    def rerank(self) -> ModelSpec | None:
        rerankers = self.by_role("rerank")
        return rerankers[0] if rerankers else None

    def joint_sparse_partner(self, dense_spec: ModelSpec) -> ModelSpec | None:
        """The sparse entry whose lexical weights come from the same bge-m3 forward pass as `dense_spec`.

        Partners: both backend "flagembedding" with flag_class "bge-m3", the same sources (primary and
        fallbacks, so both stages would load the same weights), max_length and dtype (so the pass sees the
        same tokens at the same precision). The first such sparse entry in registry order; None if none.
        """
        return next((s for s in self.sparse if _joint_partners(dense_spec, s)), None)

    def joint_dense_partner(self, sparse_spec: ModelSpec) -> ModelSpec | None:
        """The dense entry whose forward pass also yields `sparse_spec`'s rows (inverse of joint_sparse_partner)."""
        return next((d for d in self.dense if self.joint_sparse_partner(d) == sparse_spec), None)

    def get(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name or m.asset_name == name:
                return m
        raise RegistryError(f"model {name!r} is not in the registry {self.path}; known: {[m.name for m in self.models]}")


def _joint_partners(dense: ModelSpec, sparse: ModelSpec) -> bool:
    return (dense.role == "dense" and sparse.role == "sparse"
            and dense.backend == sparse.backend == "flagembedding"
            and dense.flag_class == sparse.flag_class == "bge-m3"
            and dense.candidate_sources() == sparse.candidate_sources()
            and dense.max_length == sparse.max_length and dense.dtype == sparse.dtype)


def resolve_source(source: str, base_dir: Path | None = None) -> str:
    """Turn a registry `source` into something `from_pretrained`-style loaders accept."""
    if source.startswith("package:"):
        module_name, _, subdir = source[len("package:"):].partition("/")
        spec = importlib.util.find_spec(module_name)
        if spec is None:
            raise RegistryError(f"source {source!r}: package {module_name!r} is not installed")
        if not subdir:
            module = importlib.import_module(module_name)
            getter = getattr(module, "get_model_path", None)
            if callable(getter):
                return str(getter())
        roots = list(spec.submodule_search_locations or [Path(spec.origin).parent])
        path = Path(roots[0]) / subdir
        if not path.exists():
            raise RegistryError(f"source {source!r}: {path} does not exist")
        return str(path)
    if source.startswith("path:"):
        path = Path(os.path.expanduser(source[len("path:"):]))
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.exists():
            raise RegistryError(f"source {source!r}: {path} does not exist")
        return str(path)
    return source  # hub id or absolute folder


def _spec_from_table(entry, registry_dir: Path) -> ModelSpec:
    """A validated registry_schema.ModelTable as the frozen ModelSpec every stage uses."""
    data = entry.model_dump()
    data["fallbacks"] = tuple(data["fallbacks"])
    return ModelSpec(registry_dir=registry_dir, **data)


def load_registry(path: str | os.PathLike | None = None) -> Registry:
    """Load the registry from `path`, else $RAG_CLEAN_MODEL_REGISTRY, else the bundled default.

    The whole file is validated first (registry_schema); every problem is reported in one RegistryError.
    """
    # The schema (pydantic) is imported here: the encoders and stages build ModelSpecs without it, so the
    # engine runs on a GPU box that has torch but no pydantic (the benchmarks).
    from pydantic import ValidationError


    from_env = "" if path else process_setting("model_registry")
    path = Path(path or from_env or DEFAULT_REGISTRY_PATH).expanduser()
    named = f"model registry {path}" + (f" (from {REGISTRY_ENV})" if from_env else "")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise RegistryError(f"{named} does not exist" if isinstance(exc, FileNotFoundError)
                            else f"{named} is a folder, not a TOML file") from exc
    except UnicodeDecodeError as exc:
        raise RegistryError(f"{named} is not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{named} is not valid TOML: {exc}") from exc
    try:
        parsed = RegistryFile.model_validate(raw)
    except ValidationError as exc:
        raise RegistryError((f"{REGISTRY_ENV}: " if from_env else "") + render_errors(exc, str(path))) from None
    specs = tuple(_spec_from_table(entry, path.parent) for entry in parsed.models)
    return Registry(models=specs, fusion_method=parsed.fusion.method, path=path)
