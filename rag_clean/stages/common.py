"""Pieces every stage uses: stage-record helpers and the model fingerprint."""

from __future__ import annotations

import json
import logging


from rag_clean.encoders.base import EncodeStats
from rag_clean.registry import ModelSpec

log = logging.getLogger(__name__)


ROW_BLOCK = 65536


def encode_record(stats: EncodeStats) -> dict:
    return {
        "encode": stats.to_dict(),
        "batch_seconds": [round(b.seconds, 6) for b in stats.batches],
        "batch_items": [b.items for b in stats.batches],
    }


def model_fingerprint(spec: ModelSpec) -> str:
    """What must match for stored vectors of an unchanged chunk to be reused."""
    return json.dumps({"backend": spec.backend, "source": spec.source, "pooling": spec.pooling,
                       "max_length": spec.max_length, "dim": spec.dim, "truncate_dim": spec.truncate_dim},
                      sort_keys=True)
