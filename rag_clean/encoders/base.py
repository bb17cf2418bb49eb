"""Contracts shared by every encoder backend (dense, sparse, rerank).

Backends live beside this module; `rag_clean.encoders.factory` picks one from a ModelSpec.
Every encoder streams: `encode(rows)` yields one `Encoded` per finished batch (the rows' indices and
the heads the model computed), so callers write them to storage without holding the collection's
vectors twice. `rows` is a `TokenSource` (rag_clean.encoders.tokens: texts, content hashes, token
cache) or a plain sequence of texts.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import numpy as np

from rag_clean.config.registry import ModelSpec

# What a forward pass can give per row. A backend computes a fixed subset (`Encoder.heads`); bge-m3
# computes any subset of dense / lexical / colbert in one pass.
HEADS = ("dense", "lexical", "colbert", "score")

SparseRow = tuple[np.ndarray, np.ndarray]  # (term_ids int32 [k], weights float32 [k]), heaviest first


class EncoderError(RuntimeError):
    """An encoder cannot run: the message names the model and the problem."""


@dataclass(frozen=True)
class Encoded:
    """One finished batch of any encoder: which input rows, and each head the encoder computed (None otherwise)."""

    rows: np.ndarray                          # int64 [b]: indices into the encoder's input, any order, each once
    dense: np.ndarray | None = None           # float32 [b, dim], L2-normalized, the model's native width
    lexical: list[SparseRow] | None = None    # per row: zero weights dropped, heaviest first, at most top_k terms
    colbert: list[np.ndarray] | None = None   # per row: float32 [tokens - 1, dim], one vector per real token after CLS
    score: np.ndarray | None = None           # float32 [b]: relevance of (query, passage) pairs

    def head(self, name: str):
        """The head `name`, or an error naming what this batch holds."""
        value = getattr(self, name, None) if name in HEADS else None
        if value is None:
            held = [h for h in HEADS if getattr(self, h) is not None]
            raise EncoderError(f"encoder output has no {name!r} head (it has {held})")
        return value


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


class Encoder(abc.ABC):
    """What every encoder of texts exposes: the heads it computes, its stats, encode and close."""

    spec: ModelSpec
    stats: EncodeStats
    heads: tuple[str, ...]

    @abc.abstractmethod
    def encode(self, rows) -> Iterator[Encoded]:
        """Yield one Encoded per finished batch, in any order, every row once, with the heads of `self.heads`.
        `rows`: a TokenSource (rag_clean.encoders.tokens; not imported here, it imports this module) or texts."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the model and its device memory (exclusive ensemble: before the next model loads)."""


class DenseEncoder(Encoder):
    """Maps texts to L2-normalized float32 vectors of width `dim` (the `dense` head).

    Matryoshka truncation (spec.truncate_dim) is applied by the caller
    (rag_clean.retrieval.fusion.truncate_and_normalize), so `dim` is the model's native width.
    """

    dim: int

    def encode_all(self, texts: Sequence[str], progress=None) -> np.ndarray:
        """Convenience for small inputs (queries, tests): the whole matrix in input order. `progress`: a
        telemetry.progress.ProgressLog counting the rows done."""
        from rag_clean.telemetry.progress import track

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        batches = self.encode(texts)
        for batch in (batches if progress is None else track(batches, progress)):
            out[batch.rows] = batch.dense
        return out

    def encode_queries(self, texts: Sequence[str], progress=None) -> np.ndarray:
        prefix = self.spec.query_instruction or ""
        return self.encode_all([prefix + t for t in texts], progress)


class SparseEncoder(Encoder):
    """Maps texts to term weights over a vocabulary, pruned to the top-k terms per text (the `lexical` head)."""

    vocab_size: int

    def decode_terms(self, term_ids: Sequence[int]) -> list[str]:
        raise NotImplementedError


class Reranker(abc.ABC):
    """Scores (query, passage) pairs; higher is more relevant."""

    spec: ModelSpec
    scorer_id: str  # what produced the scores, e.g. "cross-encoder:BAAI/bge-reranker-v2-m3"
    stats: EncodeStats
    heads: tuple[str, ...] = ("score",)

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
