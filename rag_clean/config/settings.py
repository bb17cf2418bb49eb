"""One typed settings object for the whole pipeline, with the source of every value.

Precedence, lowest to highest (as in the old embedder, plus Dagster run config):
defaults < config file < .env file < process environment < run config / CLI flags.
Each setting remembers which source won ("default", "config file", ".env", "override via env",
"run config" or "cli"), and telemetry records it.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

CONFIG_FILE_ENV = "EMBEDDER_CONFIG_FILE"
DEFAULT_CONFIG_FILE = Path("config/embedder.json")
ENV_PREFIX = "EMBEDDER_"

PROVENANCE_DEFAULT = "default"
PROVENANCE_CONFIG = "config file"
PROVENANCE_DOTENV = ".env"
PROVENANCE_ENV = "override via env"


# Settings of the old embedder that no longer choose anything: accepted (so old config files, .env files
# and scripts keep working) and reported once in the run's warnings, never silently dropped.
RETIRED_SETTINGS = {
    "exclusive_ensemble": "exclusive_ensemble is retired and ignored: every run keeps one dense model resident per "
                          "device at a time (one asset per model, GPU steps in the `gpu` pool)",
}


class SettingsError(ValueError):
    """A setting has a value of the wrong type; the message names the source and the key."""


@dataclass(frozen=True)
class EmbedderSettings:
    enable_sparse: bool = True
    enable_rerank: bool = True
    # Names of registry sparse models to run; empty = every sparse model in the registry.
    sparse_models: tuple[str, ...] = ()
    # Names of registry dense models in the ensemble; empty = every dense model.
    ensemble_models: tuple[str, ...] = ()
    fusion_method: str = ""            # "" = the registry's fusion.method
    top_k_candidates: int = 100
    rerank_top_k: int = 20
    rerank_batch_size: int = 32        # most (query, passage) pairs per cross-encoder batch
    rrf_k: int = 60
    query_text_mode: str = "hash"      # "hash" or "truncate" (<= 100 chars) in telemetry and exports
    enable_exports: bool = False
    export_dir: str = ""               # "" = <storage root>/exports
    reuse_unchanged: bool = True       # reuse vectors of chunks whose content hash did not change
    # Hybrid candidates: weighted sum of per-query normalized dense and sparse scores ("rrf": reciprocal rank).
    hybrid_fusion: str = "weighted"
    score_normalization: str = "minmax"    # or "zscore"
    hybrid_dense_weight: float = 0.3       # used when a collection has too few queries to tune
    tune_min_queries: int = 30             # queries with gold chunks needed to tune weights
    tune_fraction: float = 0.5             # share of queries in the tuning split; the rest is held out
    tune_ensemble_weights: bool = False    # also tune the dense models' weights (at query time)
    quality_margin: float = 0.02           # quality check: allowed drop of held-out recall@10 / MRR@10
    quality_severity: str = "warn"         # "warn" or "error" when the quality check fails
    # Data-parallel dense/sparse encoding on Ray (rag_clean.distributed): "" = off (in-process),
    # "local" = start a local cluster, "auto" / "ray://host:port" / "host:port" = join an existing one.
    ray_address: str = ""
    ray_shard_rows: int = 4096         # rows per shard sent to one actor (the unit of work and of retry)
    ray_actors: int = 2                # actors, each loading the model once (1 GPU each when the cluster has GPUs)
    # The vector_index sink (rag_clean.index): "qdrant-edge" (embedded, under the storage root), "qdrant"
    # (a server at qdrant_url, API key from the environment variable named by qdrant_api_key_env) or "off".
    index_sink: str = "qdrant-edge"
    qdrant_url: str = ""
    qdrant_api_key_env: str = "QDRANT_API_KEY"
    provenance: Mapping[str, str] = field(default_factory=dict, compare=False)
    notes: tuple[str, ...] = field(default=(), compare=False)  # retired settings that were given

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in ("provenance", "notes")]

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in ((k, getattr(self, k)) for k in self.keys())}

    def provenance_lines(self) -> list[str]:
        return [f"{k}={json.dumps(self.as_dict()[k])} ({self.provenance.get(k, PROVENANCE_DEFAULT)})" for k in self.keys()]

    def with_overrides(self, overrides: Mapping[str, Any], source: str) -> "EmbedderSettings":
        """Apply overrides (None values are ignored) and mark them with `source`."""
        values, prov, notes = {}, dict(self.provenance), list(self.notes)
        for key, raw in overrides.items():
            if raw is None:
                continue
            if key in RETIRED_SETTINGS:
                notes.append(f"{RETIRED_SETTINGS[key]} (given as {raw!r} by {source})")
                continue
            values[key] = _coerce(key, raw, source)
            prov[key] = source
        return replace(self, **values, provenance=prov, notes=tuple(notes))


_TYPES = {f.name: f.type for f in fields(EmbedderSettings)}
# (low, high, closed): the range each float setting accepts.
_FLOAT_RANGES = {"hybrid_dense_weight": (0.0, 1.0, True), "tune_fraction": (0.0, 1.0, False),
                 "quality_margin": (0.0, 1.0, True)}
_CHOICES = {"hybrid_fusion": ("weighted", "rrf"), "score_normalization": ("minmax", "zscore"),
            "quality_severity": ("warn", "error"), "index_sink": ("qdrant-edge", "qdrant", "off")}


def _coerce(key: str, raw: Any, source: str) -> Any:
    if key not in _TYPES or key in ("provenance", "notes"):
        raise SettingsError(f"{source}: unknown setting {key!r}; known: {EmbedderSettings.keys()}")
    kind = _TYPES[key]
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected a boolean (1/0, true/false, yes/no, on/off), got {raw!r}")
        if kind == "float":
            if isinstance(raw, bool):
                raise ValueError("expected a number")
            value = float(raw)
            low, high, closed = _FLOAT_RANGES[key]
            if not (low <= value <= high) or (not closed and value in (low, high)):
                raise ValueError(f"must be in {'[' if closed else '('}{low}, {high}{']' if closed else ')'}")
            return value
        if kind == "int":
            if isinstance(raw, bool):
                raise ValueError("expected an integer")
            value = int(raw)
            if value <= 0:
                raise ValueError("must be > 0")
            return value
        if kind.startswith("tuple"):
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            return tuple(str(i).strip() for i in items if str(i).strip())
        value = str(raw).strip()
        if key == "query_text_mode" and value not in ("hash", "truncate"):
            raise ValueError("must be 'hash' or 'truncate'")
        if key == "fusion_method" and value not in ("", "concat", "mean"):
            raise ValueError("must be 'concat' or 'mean'")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ValueError(f"must be one of {_CHOICES[key]}")
        if key == "ray_address" and not (value in ("", "local", "auto") or value.startswith("ray://") or ":" in value):
            raise ValueError("must be '' (off), 'local', 'auto', 'ray://host:port' or 'host:port'")
        return value
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{source}: setting {key!r}: {exc}") from exc


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"config file {path}: {exc}") from exc
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"config file {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: top level must be an object")
    return data.get("embedder", data) if isinstance(data.get("embedder"), dict) else data


def _from_environment(env: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for key in [*EmbedderSettings.keys(), *RETIRED_SETTINGS]:
        name = ENV_PREFIX + key.upper()
        if name in env and env[name] != "":
            out[key] = env[name]
    return out


def resolve_settings(
    *,
    config_file: str | os.PathLike | None = None,
    dotenv_file: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    override_source: str = "run config",
) -> EmbedderSettings:
    """Resolve settings through every layer; see the module docstring for the order."""
    environ = os.environ if environ is None else environ
    settings = EmbedderSettings(provenance={k: PROVENANCE_DEFAULT for k in EmbedderSettings.keys()})

    path = Path(config_file) if config_file else Path(environ.get(CONFIG_FILE_ENV, DEFAULT_CONFIG_FILE))
    if path.exists():
        settings = settings.with_overrides(_read_config_file(path), f"{PROVENANCE_CONFIG}")
    elif config_file:
        raise SettingsError(f"config file {path} does not exist")

    dotenv_path = Path(dotenv_file) if dotenv_file else Path(".env")
    if dotenv_path.exists():
        from dotenv import dotenv_values

        settings = settings.with_overrides(_from_environment(dotenv_values(dotenv_path)), PROVENANCE_DOTENV)

    settings = settings.with_overrides(_from_environment(environ), PROVENANCE_ENV)
    if overrides:
        settings = settings.with_overrides(overrides, override_source)
    return settings
