"""FlagEmbedding encoders: registry entries with `backend = "flagembedding"`.

- FlagDenseEncoder: FlagModel (CLS or mean pooling), or BGEM3FlagModel's dense head when
  `flag_class = "bge-m3"`.
- FlagSparseEncoder: BGEM3FlagModel lexical weights.
- BGEM3JointEncoder: dense + lexical (+ optional ColBERT) from ONE forward pass per batch.
- FlagRerankerAdapter (rag_clean.encoders.flag_rerank): FlagReranker logits.

Every one runs its batches through `rag_clean.encoders.runner` (see flag_base).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from rag_clean.encoders.base import DenseEncoder, EncoderError, SparseEncoder
from rag_clean.encoders.budget import BudgetStore
from rag_clean.encoders.device import flag_precision
from rag_clean.encoders.flag_base import FlagBackend, check_dim, load_first
from rag_clean.encoders.flag_rerank import FlagRerankerAdapter  # noqa: F401  (the factory's import site)
from rag_clean.encoders.runner import Batch, Replica
from rag_clean.encoders.tokenize import DEFAULT_WINDOW_ITEMS, Tokenizer
from rag_clean.config.registry import ModelSpec

FLAG_POOLINGS = ("cls", "mean")

SparseRow = tuple[np.ndarray, np.ndarray]


class _FlagModel(FlagBackend):
    """FlagModel: the transformer plus FlagEmbedding's pooling, L2-normalized."""

    def __init__(self, spec: ModelSpec, device, *, token_budget: int | None, budget_store: BudgetStore | None,
                 window_items: int):
        from FlagEmbedding import FlagModel  # before the load timer: the import is a one-off ~4 s

        super().__init__(spec, device)

        def load(path: str):
            # FlagModel defaults to CLS pooling and 512 tokens: always pass both from the registry.
            return FlagModel(path, pooling_method=spec.pooling, normalize_embeddings=True, devices=str(self.device),
                             query_max_length=spec.max_length, passage_max_length=spec.max_length,
                             **flag_precision(self.dtype))

        flag, self.source, self.stats.fallback = load_first(spec, load)
        self.hidden = int(flag.model.config.hidden_size)
        self.start_runner(flag, flag.model, flag.model, Tokenizer(flag.tokenizer, spec.max_length), self.source,
                          token_budget=token_budget, budget_store=budget_store, window_items=window_items)

    def forward(self, replica: Replica, batch: Batch) -> tuple[torch.Tensor, ...]:
        hidden = replica.hf(**batch.inputs, return_dict=True).last_hidden_state
        pooled = replica.model.pooling(hidden, batch.inputs["attention_mask"])
        return (torch.nn.functional.normalize(pooled.float(), dim=-1),)

    def post(self, batch: Batch, outputs: tuple[np.ndarray, ...]):
        """(dense [b, h], None, None): the shape of _M3.post, so encoders read either alike."""
        return outputs[0], None, None


class _M3(FlagBackend):
    """BGEM3FlagModel: one forward, the asked subset of dense / lexical / ColBERT outputs."""

    def __init__(self, spec: ModelSpec, device, *, dense: bool, sparse: bool, colbert: bool,
                 token_budget: int | None, budget_store: BudgetStore | None, window_items: int):
        if spec.flag_class not in (None, "bge-m3"):
            raise EncoderError(f"model {spec.name}: flag_class {spec.flag_class!r} has no lexical/joint output; use 'bge-m3'")
        from FlagEmbedding import BGEM3FlagModel  # before the load timer: the import is a one-off ~4 s

        super().__init__(spec, device)
        self.outputs = {"dense": dense, "sparse": sparse, "colbert": colbert}

        def load(path: str):
            # BGE-M3 is trained with CLS pooling; spec.pooling (default "mean") describes
            # sentence-transformers models, so it is not applied here.
            return BGEM3FlagModel(path, pooling_method="cls", normalize_embeddings=True, devices=str(self.device),
                                  query_max_length=spec.max_length, passage_max_length=spec.max_length,
                                  **flag_precision(self.dtype))

        flag, self.source, self.stats.fallback = load_first(spec, load)
        heads = flag.model  # EncoderOnlyEmbedderM3ModelForInference: transformer + sparse/colbert heads
        config = heads.model.config
        self.hidden = int(config.hidden_size)
        self.hf_tokenizer = flag.tokenizer
        self.vocab_size = max(int(config.vocab_size), len(flag.tokenizer))
        self.top_k = int(spec.top_k)
        # Same exclusions as FlagEmbedding's lexical weights: CLS/EOS/PAD/UNK carry no term.
        tok = flag.tokenizer
        self.unused_ids = np.array(sorted({
            tid for tid in (tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) if tid is not None
        }), dtype=np.int64)
        self.start_runner(flag, heads, heads.model, Tokenizer(tok, spec.max_length), self.source,
                          token_budget=token_budget, budget_store=budget_store, window_items=window_items)

    def forward(self, replica: Replica, batch: Batch) -> tuple[torch.Tensor, ...]:
        want = self.outputs
        out = replica.parts["module"](batch.inputs, return_dense=want["dense"], return_sparse=want["sparse"],
                                      return_colbert_vecs=want["colbert"])
        keys = (("dense", "dense_vecs"), ("sparse", "sparse_vecs"), ("colbert", "colbert_vecs"))
        return tuple(out[key].float() for name, key in keys if want[name])

    def post(self, batch: Batch, outputs: tuple[np.ndarray, ...]):
        """(dense [b, h] | None, sparse rows | None, ColBERT [n_i - 1, h] per row | None)."""
        host = iter(outputs)
        dense = next(host) if self.outputs["dense"] else None
        sparse = colbert = None
        lengths = batch.lengths
        if self.outputs["sparse"]:
            weights = next(host).squeeze(-1)
            ids = batch.host["input_ids"]
            sparse = [lexical_top_k(ids[i, :n], weights[i, :n], self.unused_ids, self.top_k)
                      for i, n in enumerate(lengths)]
        if self.outputs["colbert"]:
            vecs = next(host)
            # ColBERT vectors skip CLS; keep only real tokens (FlagEmbedding drops the rest the same way).
            colbert = [vecs[i, : n - 1].copy() for i, n in enumerate(lengths)]
        return dense, sparse, colbert


def lexical_top_k(input_ids: np.ndarray, weights: np.ndarray, unused_ids: np.ndarray, top_k: int) -> SparseRow:
    """Per-term max weight over a text's tokens -> (term_ids int32, weights float32), desc, <= top_k.

    Ties break by term id so output is deterministic.
    """
    keep = (weights > 0) & ~np.isin(input_ids, unused_ids)
    ids, w = input_ids[keep], weights[keep]
    if ids.size == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    order = np.lexsort((-w, ids))  # by id, heaviest first within an id
    ids, w = ids[order], w[order]
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    ids, w = ids[first], w[first]
    top = np.lexsort((ids, -w))[:top_k]
    return ids[top].astype(np.int32), w[top].astype(np.float32)


class _FlagEncoder:
    """Delegates stats / source / transformer / close to the backend that runs the model."""

    _backend: FlagBackend

    @property
    def stats(self):
        return self._backend.stats

    @property
    def source(self) -> str:
        return self._backend.source

    @property
    def transformer(self) -> torch.nn.Module:
        return self._backend.transformer

    def close(self) -> None:
        self._backend.close()


class FlagDenseEncoder(_FlagEncoder, DenseEncoder):
    """Dense vectors from FlagModel (spec.pooling "cls" / "mean") or, with flag_class "bge-m3", BGEM3FlagModel."""

    def __init__(self, spec: ModelSpec, device: str | Sequence[str] = "cpu", *, token_budget: int | None = None,
                 budget_store: BudgetStore | None = None, window_items: int = DEFAULT_WINDOW_ITEMS):
        self.spec = spec
        budget = {"token_budget": token_budget, "budget_store": budget_store, "window_items": window_items}
        if spec.flag_class == "bge-m3":
            self._backend = _M3(spec, device, dense=True, sparse=False, colbert=False, **budget)
        elif spec.flag_class is not None:
            raise EncoderError(f"model {spec.name}: unknown flag_class {spec.flag_class!r} (known: 'bge-m3' or none)")
        elif spec.pooling not in FLAG_POOLINGS:
            raise EncoderError(f"model {spec.name}: pooling {spec.pooling!r} is not supported by FlagModel {FLAG_POOLINGS}")
        else:
            self._backend = _FlagModel(spec, device, **budget)
        self.dim = check_dim(spec, self._backend.hidden, self.source)

    def encode(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for rows, (dense, _, _) in self._backend.runner.run(texts):
            yield rows, dense


class FlagSparseEncoder(_FlagEncoder, SparseEncoder):
    """BGE-M3 lexical weights: (term_ids int32, weights float32) per text, heaviest first, <= spec.top_k."""

    def __init__(self, spec: ModelSpec, device: str | Sequence[str] = "cpu", *, token_budget: int | None = None,
                 budget_store: BudgetStore | None = None, window_items: int = DEFAULT_WINDOW_ITEMS):
        self.spec = spec
        self._backend = _M3(spec, device, dense=False, sparse=True, colbert=False, token_budget=token_budget,
                            budget_store=budget_store, window_items=window_items)
        self.vocab_size = self._backend.vocab_size

    def encode(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, list[SparseRow]]]:
        for rows, (_, sparse_rows, _) in self._backend.runner.run(texts):
            yield rows, sparse_rows

    def decode_terms(self, term_ids: Sequence[int]) -> list[str]:
        return self._backend.hf_tokenizer.convert_ids_to_tokens([int(t) for t in term_ids])


class BGEM3JointEncoder(_FlagEncoder):
    """Dense + lexical (+ ColBERT when asked) from one forward pass per batch of a BGE-M3 model.

    Use instead of a FlagDenseEncoder and a FlagSparseEncoder on the same model: half the compute.
    `stats` covers the joint pass; `dim` is the dense width, `vocab_size` the lexical id space.
    """

    def __init__(self, spec: ModelSpec, device: str | Sequence[str] = "cpu", *, return_colbert: bool = False,
                 token_budget: int | None = None, budget_store: BudgetStore | None = None,
                 window_items: int = DEFAULT_WINDOW_ITEMS):
        self.spec = spec
        self.return_colbert = return_colbert
        self._backend = _M3(spec, device, dense=True, sparse=True, colbert=return_colbert, token_budget=token_budget,
                            budget_store=budget_store, window_items=window_items)
        self.dim = check_dim(spec, self._backend.hidden, self.source)
        self.vocab_size = self._backend.vocab_size

    def encode_joint(self, texts: Sequence[str]) -> Iterator[
            tuple[np.ndarray, np.ndarray, list[SparseRow], list[np.ndarray] | None]]:
        """Yield (row_indices int64 [b], dense float32 [b, dim], sparse rows, ColBERT [n_i, dim] per row | None)."""
        for rows, (dense, sparse_rows, colbert) in self._backend.runner.run(texts):
            yield rows, dense, sparse_rows, colbert

    def decode_terms(self, term_ids: Sequence[int]) -> list[str]:
        return self._backend.hf_tokenizer.convert_ids_to_tokens([int(t) for t in term_ids])
