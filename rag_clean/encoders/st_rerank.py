"""Cross-encoder reranking from sentence-transformers CrossEncoder folders."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from rag_clean.encoders.base import EncoderError, Reranker, check_pairs
from rag_clean.encoders.runner import Batch, Replica
from rag_clean.encoders.st_base import STBackend
from rag_clean.encoders.tokenize import DEFAULT_WINDOW_ITEMS
from rag_clean.config.registry import ModelSpec


def _classifier_on_cls(hf):
    """fn(cls_hidden [b, d]) -> logits for BERT / RoBERTa sequence classifiers, else None."""
    model_type = getattr(hf.config, "model_type", "")
    if model_type in ("roberta", "xlm-roberta") and hasattr(hf, "classifier"):
        return lambda cls: hf.classifier(cls.unsqueeze(1))  # the head reads features[:, 0]
    bert = getattr(hf, "bert", None)
    if model_type == "bert" and bert is not None and bert.pooler is not None and isinstance(hf.classifier, torch.nn.Linear):
        return lambda cls: hf.classifier(bert.pooler(cls.unsqueeze(1)))
    return None


class STCrossEncoderReranker(STBackend, Reranker):
    """Cross-encoder scores (the model's activation applied, as CrossEncoder.predict does)."""

    heads = ("score",)
    role = "rerank"

    def __init__(self, spec: ModelSpec, device="cpu", *, source: str | None = None, budget_store=None,
                 token_budget: int | None = None, window_items: int = DEFAULT_WINDOW_ITEMS,
                 source_label: str | None = None, **engine_options):
        path = source or spec.resolve_source()
        super().__init__(spec, device, source=path, budget_store=budget_store, token_budget=token_budget,
                         window_items=window_items, **engine_options)
        tok_names = getattr(self.tokenizer.hf, "model_input_names", []) or []
        self.tokenizer.with_type_ids = "token_type_ids" in tok_names and getattr(self.config, "type_vocab_size", 1) > 1
        first = self.replicas[0].model
        if first.num_labels != 1:
            n = first.num_labels
            self.close()
            raise EncoderError(f"model {spec.name}: {path} has {n} labels; a reranker needs a single relevance logit")
        self.activation = first.activation
        # Name the source as the registry spelled it (hub id, package:...), not the local cache path.
        self.scorer_id = f"cross-encoder:{source_label or spec.source}"
        for r in self.replicas:
            r.parts["head_on_cls"] = _classifier_on_cls(r.hf)
        if all(r.parts["head_on_cls"] is not None for r in self.replicas):
            self.enable_fast(lambda m: m.base_model)

    def forward(self, replica: Replica, batch: Batch) -> tuple[torch.Tensor, ...]:
        if replica.fast is not None:
            hidden = self.fast_hidden(replica, batch)
            logits = replica.parts["head_on_cls"](hidden[batch.inputs["cu_seqlens"][:-1].long()]).float()
        else:
            logits = replica.hf(**batch.inputs, return_dict=True).logits.float()
        scores = self.activation(logits) if self.activation is not None else logits
        return (scores.reshape(-1),)

    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        return self.runner.score_pairs(check_pairs(pairs, self.spec.name))
