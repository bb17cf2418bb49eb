"""FlagReranker through the runner: FlagEmbedding loads the cross-encoder, the runner batches it.

Pairs are tokenized exactly as FlagReranker.compute_score does (query truncated on its own to
`query_max_length`, then the passage truncated to fit `max_length`), so the scores are
FlagReranker's raw logits (no sigmoid) for the same inputs. On CUDA OOM the runner halves the
token budget and retries the same pairs, like every other backend.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from rag_clean.encoders.base import EncoderError, Reranker, check_pairs
from rag_clean.encoders.budget import BudgetStore
from rag_clean.encoders.device import flag_precision
from rag_clean.encoders.flag_base import FlagBackend
from rag_clean.encoders.runner import Batch, Replica
from rag_clean.encoders.tokenize import DEFAULT_WINDOW_ITEMS, TokenWindow, check_strings
from rag_clean.config.registry import ModelSpec


class FlagPairTokenizer:
    """(query, passage) -> token ids, the way FlagReranker.compute_score builds them."""

    def __init__(self, hf_tokenizer, max_length: int, query_max_length: int | None):
        self.hf = hf_tokenizer
        self.max_length = int(max_length)
        self.query_max_length = int(query_max_length or max_length * 3 // 4)
        self.pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else 0

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None, start: int = 0) -> TokenWindow:
        from FlagEmbedding.utils.tokenizer_compat import prepare_for_model_compat

        t0 = time.perf_counter()
        if pairs is None:
            raise EncoderError("a reranker tokenizes (query, passage) pairs")
        check_strings(texts, pairs, start)
        queries = self.hf(list(texts), add_special_tokens=False, max_length=self.query_max_length,
                          truncation=True)["input_ids"]
        passages = self.hf(list(pairs), add_special_tokens=False, max_length=self.max_length,
                           truncation=True)["input_ids"]
        id_rows, type_rows = [], []
        for q, p in zip(queries, passages):
            item = prepare_for_model_compat(self.hf, q, p, truncation="only_second", max_length=self.max_length,
                                            padding=False)
            id_rows.append(np.asarray(item["input_ids"], dtype=np.int32))
            if "token_type_ids" in item:
                type_rows.append(np.asarray(item["token_type_ids"], dtype=np.int32))
        return TokenWindow.from_rows(start, id_rows, type_rows if len(type_rows) == len(id_rows) else None,
                                     seconds=time.perf_counter() - t0)


class FlagRerankerAdapter(FlagBackend, Reranker):
    """FlagReranker scores (raw logits) over the runner's token-budget batches."""

    heads = ("score",)

    def __init__(self, spec: ModelSpec, device: str | Sequence[str] = "cpu", *, token_budget: int | None = None,
                 budget_store: BudgetStore | None = None, window_items: int = DEFAULT_WINDOW_ITEMS):
        from FlagEmbedding import FlagReranker  # before the load timer: the import is a one-off ~4 s

        super().__init__(spec, device)
        # Only spec.source: load_reranker in the factory walks the fallbacks itself (one adapter per
        # source) and records which one loaded.
        self.source = spec.source
        try:
            # FlagReranker has an fp16 flag only; the runner casts the model to the resolved dtype itself.
            reranker = FlagReranker(spec.resolve_source(), use_fp16=flag_precision(self.dtype)["use_fp16"],
                                    devices=str(self.device), max_length=spec.max_length, normalize=False)
        except Exception as exc:
            raise EncoderError(f"model {spec.name}: cannot load reranker {spec.source!r}: {type(exc).__name__}: {exc}") from exc
        self.scorer_id = f"flag-reranker:{self.source}"
        tokenizer = FlagPairTokenizer(reranker.tokenizer, spec.max_length, reranker.query_max_length)
        self.start_runner(reranker, reranker.model, reranker.model, tokenizer, self.source,
                          token_budget=token_budget, budget_store=budget_store, window_items=window_items)

    def forward(self, replica: Replica, batch: Batch) -> tuple[torch.Tensor, ...]:
        return (replica.hf(**batch.inputs, return_dict=True).logits.view(-1).float(),)

    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        return self.runner.score_pairs(check_pairs(pairs, self.spec.name))
