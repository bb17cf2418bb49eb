"""Pipeline settings as a Dagster resource: every field left unset falls through to
config file < .env < environment; fields set in run config win and are recorded as "run config"."""


from typing import Optional

import dagster as dg

from rag_clean.config.settings import RETIRED_SETTINGS, EmbedderSettings, resolve_settings


class EmbedderSettingsResource(dg.ConfigurableResource):
    """One field per setting of rag_clean.config.settings.EmbedderSettings (a test keeps the two in step)."""

    config_file: str = ""
    dotenv_file: str = ""
    enable_sparse: Optional[bool] = None
    enable_rerank: Optional[bool] = None
    sparse_models: Optional[list[str]] = None
    ensemble_models: Optional[list[str]] = None
    fusion_method: Optional[str] = None
    top_k_candidates: Optional[int] = None
    rerank_top_k: Optional[int] = None
    rerank_batch_size: Optional[int] = None
    rrf_k: Optional[int] = None
    query_text_mode: Optional[str] = None
    enable_exports: Optional[bool] = None
    export_dir: Optional[str] = None
    reuse_unchanged: Optional[bool] = None
    hybrid_fusion: Optional[str] = None
    score_normalization: Optional[str] = None
    hybrid_dense_weight: Optional[float] = None
    tune_min_queries: Optional[int] = None
    tune_fraction: Optional[float] = None
    tune_ensemble_weights: Optional[bool] = None
    quality_margin: Optional[float] = None
    quality_severity: Optional[str] = None
    ray_address: Optional[str] = None
    ray_shard_rows: Optional[int] = None
    ray_actors: Optional[int] = None
    index_sink: Optional[str] = None
    qdrant_url: Optional[str] = None
    qdrant_api_key_env: Optional[str] = None
    # Retired (accepted so old run configs keep working; reported in the run's warnings).
    exclusive_ensemble: Optional[bool] = None
    override_source: str = "run config"

    def resolve(self) -> EmbedderSettings:
        overrides = {k: getattr(self, k) for k in [*EmbedderSettings.keys(), *RETIRED_SETTINGS]}
        return resolve_settings(
            config_file=self.config_file or None,
            dotenv_file=self.dotenv_file or None,
            overrides=overrides,
            override_source=self.override_source,
        )
