"""Running the encoding stages beyond one process (Ray). Nothing here imports Ray until it is used."""

from rag_clean.distributed.ray_encode import (
    RayEncodeError,
    RayShardedEncoder,
    RayUnavailableError,
    encode_dense_sharded,
    encode_sparse_sharded,
    ray_dense_encoder,
    ray_sparse_encoder,
)

__all__ = [
    "RayEncodeError", "RayShardedEncoder", "RayUnavailableError", "encode_dense_sharded", "encode_sparse_sharded",
    "ray_dense_encoder", "ray_sparse_encoder",
]
