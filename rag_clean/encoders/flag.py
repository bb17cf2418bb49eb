"""FlagEmbedding encoders: registry entries with `backend = "flagembedding"`.

- FlagModelEncoder: FlagModel (CLS or mean pooling), the `dense` head.
- BGEM3Encoder: BGEM3FlagModel; one forward pass per batch gives the heads asked for, any subset of
  `dense`, `lexical` and `colbert`. A bge-m3 dense model is BGEM3Encoder(heads=("dense",)), its sparse
  partner BGEM3Encoder(heads=("lexical",)), the joint pass of the dense stage the union of what it writes.
- FlagRerankerAdapter (rag_clean.encoders.flag_rerank): FlagReranker logits, the `score` head.

`flag_dense_encoder` / `flag_sparse_encoder` pick one for a spec (the factory's entry points). Every one
runs its batches through `rag_clean.encoders.runner` (see flag_base).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from rag_clean.encoders.base import DenseEncoder, Encoded, EncoderError, SparseEncoder, SparseRow
from rag_clean.encoders.budget import BudgetStore
from rag_clean.encoders.device import flag_precision
from rag_clean.encoders.flag_base import FlagBackend, check_dim, load_first
from rag_clean.encoders.flag_rerank import FlagRerankerAdapter  # noqa: F401  (the factory's import site)
from rag_clean.encoders.runner import Batch, Replica
from rag_clean.encoders.tokenize import DEFAULT_WINDOW_ITEMS, Tokenizer
from rag_clean.config.registry import ModelSpec

FLAG_POOLINGS = ("cls", "mean")
# The heads of BGEM3FlagModel, in the order its forward returns them, and the key of each in its output.
M3_HEADS = {"dense": "dense_vecs", "lexical": "sparse_vecs", "colbert": "colbert_vecs"}


class FlagModelEncoder(FlagBackend, DenseEncoder):
    """FlagModel: the transformer plus FlagEmbedding's pooling, L2-normalized."""

    heads = ("dense",)

    def __init__(self, spec: ModelSpec, device: str | Sequence[str] = "cpu", *, token_budget: int | None = None,
                 budget_store: BudgetStore | None = None, window_items: int = DEFAULT_WINDOW_ITEMS):
        from FlagEmbedding import FlagModel  # before the load timer: the import is a one-off ~4 s

        super().__init__(spec, device)

        def load(path: str):
            # FlagModel defaults to CLS pooling and 512 tokens: always pass both from the registry.
            return FlagModel(path, pooling_method=spec.pooling, normalize_embeddings=True, devices=str(self.device),
                             query_max_length=spec.max_length, passage_max_length=spec.max_length,
                             **flag_precision(self.dtype))

        flag, self.source, self.stats.fallback = load_first(spec, load)
        self.dim = check_dim(spec, int(flag.model.config.hidden_size), self.source)
        self.start_runner(flag, flag.model, flag.model, Tokenizer(flag.tokenizer, spec.max_length), self.source,
                          token_budget=token_budget, budget_store=budget_store, window_items=window_items)

    def forward(self, replica: Replica, batch: Batch) -> tuple[torch.Tensor, ...]:
        hidden = replica.hf(**batch.inputs, return_dict=True).last_hidden_state
        pooled = replica.model.pooling(hidden, batch.inputs["attention_mask"])
        return (torch.nn.functional.normalize(pooled.float(), dim=-1),)


class BGEM3Encoder(FlagBackend, DenseEncoder, SparseEncoder):
    """BGEM3FlagModel: one forward per batch, the asked subset of the dense / lexical / ColBERT heads.

    `dim` is the dense width, `vocab_size` the lexical id space; lexical rows are pruned to spec.top_k.
    """

    def __init__(self, spec: ModelSpec, device: str | Sequence[str] = "cpu", *, heads: Sequence[str] = ("dense",),
                 token_budget: int | None = None, budget_store: BudgetStore | None = None,
                 window_items: int = DEFAULT_WINDOW_ITEMS):
        if spec.flag_class not in (None, "bge-m3"):
            raise EncoderError(f"model {spec.name}: flag_class {spec.flag_class!r} has no lexical/joint output; use 'bge-m3'")
        unknown = sorted(set(heads) - set(M3_HEADS))
        if unknown or not heads:
            raise EncoderError(f"model {spec.name}: bge-m3 heads {list(heads)} (choose from {list(M3_HEADS)})")
        from FlagEmbedding import BGEM3FlagModel  # before the load timer: the import is a one-off ~4 s

        super().__init__(spec, device)
        self.heads = tuple(h for h in M3_HEADS if h in heads)

        def load(path: str):
            # BGE-M3 is trained with CLS pooling; spec.pooling (default "mean") describes
            # sentence-transformers models, so it is not applied here.
            return BGEM3FlagModel(path, pooling_method="cls", normalize_embeddings=True, devices=str(self.device),
                                  query_max_length=spec.max_length, passage_max_length=spec.max_length,
                                  **flag_precision(self.dtype))

        flag, self.source, self.stats.fallback = load_first(spec, load)
        module = flag.model  # EncoderOnlyEmbedderM3ModelForInference: transformer + sparse/colbert heads
        config = module.model.config
        hidden = int(config.hidden_size)
        self.dim = check_dim(spec, hidden, self.source) if "dense" in self.heads else hidden
        self.hf_tokenizer = flag.tokenizer
        self.vocab_size = max(int(config.vocab_size), len(flag.tokenizer))
        self.top_k = int(spec.top_k)
        # Same exclusions as FlagEmbedding's lexical weights: CLS/EOS/PAD/UNK carry no term.
        tok = flag.tokenizer
        self.unused_ids = np.array(sorted({
            tid for tid in (tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) if tid is not None
        }), dtype=np.int64)
        self.start_runner(flag, module, module.model, Tokenizer(tok, spec.max_length), self.source,
                          token_budget=token_budget, budget_store=budget_store, window_items=window_items)

    def forward(self, replica: Replica, batch: Batch) -> tuple[torch.Tensor, ...]:
        out = replica.parts["module"](batch.inputs, return_dense="dense" in self.heads,
                                      return_sparse="lexical" in self.heads,
                                      return_colbert_vecs="colbert" in self.heads)
        return tuple(out[M3_HEADS[h]].float() for h in self.heads)

    def post(self, batch: Batch, outputs: tuple[np.ndarray, ...]) -> Encoded:
        host = dict(zip(self.heads, outputs))
        heads = {}
        lengths = batch.lengths
        if "dense" in host:
            heads["dense"] = host["dense"]
        if "lexical" in host:
            weights = host["lexical"].squeeze(-1)
            ids = batch.host["input_ids"]
            heads["lexical"] = [lexical_top_k(ids[i, :n], weights[i, :n], self.unused_ids, self.top_k)
                                for i, n in enumerate(lengths)]
        if "colbert" in host:
            vecs = host["colbert"]
            # ColBERT vectors skip CLS; keep only real tokens (FlagEmbedding drops the rest the same way).
            heads["colbert"] = [vecs[i, : n - 1].copy() for i, n in enumerate(lengths)]
        return Encoded(batch.indices, **heads)

    def decode_terms(self, term_ids: Sequence[int]) -> list[str]:
        return self.hf_tokenizer.convert_ids_to_tokens([int(t) for t in term_ids])


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


def flag_dense_encoder(spec: ModelSpec, device: str | Sequence[str] = "cpu", **options) -> DenseEncoder:
    """Dense vectors from FlagModel (spec.pooling "cls" / "mean") or, with flag_class "bge-m3", BGEM3FlagModel's
    dense head. `options`: token_budget, budget_store, window_items."""
    if spec.flag_class == "bge-m3":
        return BGEM3Encoder(spec, device, heads=("dense",), **options)
    if spec.flag_class is not None:
        raise EncoderError(f"model {spec.name}: unknown flag_class {spec.flag_class!r} (known: 'bge-m3' or none)")
    if spec.pooling not in FLAG_POOLINGS:
        raise EncoderError(f"model {spec.name}: pooling {spec.pooling!r} is not supported by FlagModel {FLAG_POOLINGS}")
    return FlagModelEncoder(spec, device, **options)


def flag_sparse_encoder(spec: ModelSpec, device: str | Sequence[str] = "cpu", **options) -> SparseEncoder:
    """BGE-M3 lexical weights: (term_ids int32, weights float32) per text, heaviest first, <= spec.top_k."""
    return BGEM3Encoder(spec, device, heads=("lexical",), **options)
