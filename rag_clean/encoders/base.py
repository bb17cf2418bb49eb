"""Contracts shared by every encoder backend (dense, sparse, rerank).

Backends live beside this module; `rag_clean.encoders.factory` picks one from a ModelSpec.
Every encoder streams: `encode` yields batches as they finish, so callers write them to
storage without holding the collection's vectors twice.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import numpy as np

from rag_clean.config.registry import ModelSpec


class EncoderError(RuntimeError):
    """An encoder cannot run: the message names the model and the problem."""


@dataclass
class BatchRecord:
    """One forward pass that finished."""

    items: int
    tokens: int            # real (unpadded) tokens in the batch
    padded_tokens: int     # tokens the device actually processed (items x padded length, or = tokens when unpadded)
    seconds: float
    token_budget: int


@dataclass
class EncodeStats:
    """What an encoder measured while it ran; the telemetry layer turns this into v4.x fields."""

    model: str
    backend: str
    device: str
    dtype: str
    load_seconds: float = 0.0
    tokenize_seconds: float = 0.0
    truncated_inputs: int = 0      # inputs longer than the model's max length, encoded from their first tokens
    truncated_rows: list[int] = field(default_factory=list)  # which (input positions): carried with reused rows
    max_length: int | None = None
    wall_seconds: float = 0.0
    batches: list[BatchRecord] = field(default_factory=list)
    # Each entry: {"event": "oom_backoff", "batch_index": i, "old_budget": a, "new_budget": b, "device": d}
    oom_mitigations: list[dict] = field(default_factory=list)
    token_budget_start: int | None = None
    token_budget_final: int | None = None
    fallback: dict | None = None  # {"applied": bool, "reason": str, "source": str} when a fallback path ran
    token_cache: dict | None = None  # {"file", "hits", "misses"} when chunk token ids came through a TokenCache

    @property
    def items(self) -> int:
        return sum(b.items for b in self.batches)

    @property
    def tokens(self) -> int:
        return sum(b.tokens for b in self.batches)

    def latency_percentiles_ms(self) -> dict[str, float]:
        if not self.batches:
            return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
        secs = np.array([b.seconds for b in self.batches]) * 1000.0
        return {p: float(np.percentile(secs, q)) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))}

    def tokens_per_second(self) -> float:
        return float(self.tokens / self.wall_seconds) if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("batches")
        out.pop("truncated_rows")  # per row: the stage keeps what it needs (content hashes), not the summary
        out.update(
            items=self.items,
            tokens=self.tokens,
            batch_count=len(self.batches),
            tokens_per_second=self.tokens_per_second(),
            latency_ms=self.latency_percentiles_ms(),
        )
        return out


class DenseEncoder(abc.ABC):
    """Maps texts to L2-normalized float32 vectors of width `dim`."""

    spec: ModelSpec
    dim: int
    stats: EncodeStats

    @abc.abstractmethod
    def encode(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (row_indices int64 [b], vectors float32 [b, dim]) in any order, every index once.

        Rows are L2-normalized. Matryoshka truncation (spec.truncate_dim) is applied by the
        caller (rag_clean.retrieval.fusion.truncate_and_normalize), so `dim` is the model's native width.
        """

    def encode_all(self, texts: Sequence[str], progress=None) -> np.ndarray:
        """Convenience for small inputs (queries, tests): the whole matrix in input order. `progress`: a
        telemetry.progress.ProgressLog counting the rows done."""
        from rag_clean.telemetry.progress import track

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        batches = self.encode(texts)
        for idx, vecs in (batches if progress is None else track(batches, progress)):
            out[idx] = vecs
        return out

    def encode_queries(self, texts: Sequence[str], progress=None) -> np.ndarray:
        prefix = self.spec.query_instruction or ""
        return self.encode_all([prefix + t for t in texts], progress)

    @abc.abstractmethod
    def close(self) -> None:
        """Release the model and its device memory (exclusive ensemble: before the next model loads)."""


class SparseEncoder(abc.ABC):
    """Maps texts to term weights over a vocabulary, pruned to the top-k terms per text."""

    spec: ModelSpec
    vocab_size: int
    stats: EncodeStats

    @abc.abstractmethod
    def encode(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]]:
        """Yield (row_indices int64 [b], [(term_ids int32 [k], weights float32 [k]) per row]).

        Terms of each row sorted by weight, descending; zero weights dropped; at most spec.top_k.
        """

    def decode_terms(self, term_ids: Sequence[int]) -> list[str]:
        raise NotImplementedError

    @abc.abstractmethod
    def close(self) -> None: ...


class Reranker(abc.ABC):
    """Scores (query, passage) pairs; higher is more relevant."""

    spec: ModelSpec
    scorer_id: str  # what produced the scores, e.g. "cross-encoder:BAAI/bge-reranker-v2-m3"
    stats: EncodeStats

    @abc.abstractmethod
    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """float32 scores in input order."""

    @abc.abstractmethod
    def close(self) -> None: ...


def check_pairs(pairs: Sequence[tuple[str, str]], model: str) -> list[tuple[str, str]]:
    """`pairs` as a list, or an error naming the first row that is not a (query, passage) pair of strings."""
    pairs = list(pairs)
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise EncoderError(f"model {model}: pair {i} is not a (query, passage) pair of strings")
    return pairs
