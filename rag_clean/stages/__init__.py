"""Each pipeline stage as a plain function: inputs in, (value, typed stage record) out.

The Dagster assets are thin wrappers over these, and the same functions run on a GPU box with
no Dagster. Records (rag_clean.telemetry.records) hold measured values only; telemetry renders them.
One module per stage: dense, joint (bge-m3 one-pass outputs), fusion, sparse, retrieval.
"""

from rag_clean.config.plan import RetrievalConfig
from rag_clean.stages.common import ROW_BLOCK, StageOutput, StageTimer, model_fingerprint, sparse_fingerprint
from rag_clean.stages.dense import run_dense_stage
from rag_clean.stages.fusion import run_fusion_stage
from rag_clean.stages.joint import JOINT_SPARSE_SCHEMA, JointOutputs, colbert_schema, joint_outputs
from rag_clean.stages.retrieval import run_retrieval_stage
from rag_clean.stages.sparse import (
    SPARSE_SCHEMA,
    SharedSparseSource,
    load_shared_sparse_rows,
    run_sparse_stage,
    shared_sparse_sources,
    sparse_from_metadata,
)

__all__ = [
    "ROW_BLOCK", "StageOutput", "StageTimer", "model_fingerprint", "run_dense_stage", "run_fusion_stage",
    "JOINT_SPARSE_SCHEMA", "JointOutputs", "colbert_schema", "joint_outputs", "sparse_fingerprint",
    "RetrievalConfig", "run_retrieval_stage", "SPARSE_SCHEMA", "SharedSparseSource", "load_shared_sparse_rows",
    "run_sparse_stage", "shared_sparse_sources", "sparse_from_metadata",
]
