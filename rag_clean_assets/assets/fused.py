"""fused_embeddings: weighted fusion of the dense ensemble (concat by default, mean as in the old embedder)."""


from typing import Optional

import dagster as dg
import pyarrow as pa

from rag_clean.config.registry import Registry
from rag_clean.stages.context import StageOutput
from rag_clean.stages.fusion import FUSION
from rag_clean.storage.embeddings import EmbeddingSet, embedding_schema
from rag_clean_assets.assets.common import run_asset, stage_asset
from rag_clean_assets.assets.dense import dense_asset_key
from rag_clean_assets import versions
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource

FUSED_KEY = dg.AssetKey("fused_embeddings")


def build_fused_asset(registry: Registry) -> dg.AssetsDefinition:
    ins = {spec.asset_name: dg.AssetIn(key=dense_asset_key(spec)) for spec in registry.dense}

    @dg.asset(
        key=FUSED_KEY,
        ins={"chunks": dg.AssetIn(key="chunks"), **ins},
        **stage_asset(group="embeddings", kinds={"numpy", "arrow"}, code_version=versions.fused_code_version(registry),
                      gpu=False, columns=embedding_schema(None)),
        description="Weighted fusion of the dense models. concat (default): each unit vector scaled by sqrt(weight), "
                    "concatenated, so cosine = weighted sum of per-model cosines; mean: the old weighted mean.",
    )
    def fused_embeddings(context: dg.AssetExecutionContext, chunks: pa.Table, registry: ModelRegistryResource,
                         settings: EmbedderSettingsResource, paths: PathsResource, **dense_sets: Optional[EmbeddingSet]) -> dg.Output[StageOutput]:
        return run_asset(context, FUSION, chunks, dense_sets, paths=paths, registry=registry, settings=settings)

    return fused_embeddings
