"""Each pipeline stage as a plain function `(ctx, io, *inputs) -> (value, typed stage record)`, declared
as a `Stage` and run by `run_stage` (rag_clean.stages.context), which owns the shared plumbing.

The Dagster assets are one call each (`run_asset` -> `run_stage`), and the same functions run on a GPU
box with no Dagster. Records (rag_clean.telemetry.records) hold measured values only; telemetry renders
them. One module per stage: chunks, dense, joint (bge-m3 one-pass outputs), fusion, sparse, retrieval
(queries, reranked; with query_side and rerank), exports.
"""

from rag_clean.stages.common import ROW_BLOCK
from rag_clean.stages.context import EmbeddedChunks, Stage, StageContext, StageIO, StageOutput, StageTimer, run_stage

__all__ = ["ROW_BLOCK", "EmbeddedChunks", "Stage", "StageContext", "StageIO", "StageOutput", "StageTimer",
           "run_stage"]
