"""fused_embeddings: weighted fusion of the dense ensemble (concat by default, mean as in the old embedder)."""


from typing import Optional

import dagster as dg
import pyarrow as pa

from rag_clean.config.registry import Registry
from rag_clean.stages import run_fusion_stage
from rag_clean.stages.common import StageOutput, StageTimer
from rag_clean.storage.embeddings import EmbeddingSet
from rag_clean_assets.assets.common import previous_embeddings, run_plan, stage_asset, staged_file, start_record
from rag_clean_assets.assets.dense import dense_asset_key
from rag_clean_assets import versions
from rag_clean_assets.versions import versioned
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
                      gpu=False),
        description="Weighted fusion of the dense models. concat (default): each unit vector scaled by sqrt(weight), "
                    "concatenated, so cosine = weighted sum of per-model cosines; mean: the old weighted mean.",
    )
    def fused_embeddings(context: dg.AssetExecutionContext, chunks: pa.Table, registry: ModelRegistryResource,
                         settings: EmbedderSettingsResource, paths: PathsResource, **dense_sets: Optional[EmbeddingSet]) -> dg.Output[StageOutput]:
        timer = StageTimer()
        plan = run_plan(context, registry, settings)
        missing = [s.name for s in plan.dense if dense_sets.get(s.asset_name) is None]
        if missing:
            raise ValueError(f"dense_embeddings of {missing} have no stored file for {context.partition_key!r}: "
                             "materialize them first (or leave them out of ensemble_models)")
        sets = {s.name: dense_sets[s.asset_name] for s in plan.dense}
        target = staged_file(paths, FUSED_KEY, context.partition_key)
        previous = previous_embeddings(context, plan, target, "previous fused vectors unreadable, fusing every row")
        writer, record = run_fusion_stage(sets, plan.fusion_weights, plan.fusion_method, target, chunks,
                                          previous=previous)
        return versioned(context, StageOutput(writer, timer.stamp(start_record(record, plan))))

    return fused_embeddings
