"""Dense vectors from SentenceTransformer model folders."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rag_clean.encoders.base import DenseEncoder, EncoderError
from rag_clean.encoders.fast_bert import pool_unpadded
from rag_clean.encoders.runner import Batch, Replica
from rag_clean.encoders.st_base import STBackend
from rag_clean.encoders.tokenize import DEFAULT_WINDOW_ITEMS
from rag_clean.config.registry import ModelSpec


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool [b, L, d] hidden states over the real tokens of `mask` [b, L], in float32."""
    if mode == "cls":
        return hidden[:, 0].float()
    if mode == "lasttoken":
        last = mask.sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
    m = mask.unsqueeze(-1)
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(1).float()
    summed = (hidden.float() * m).sum(1)
    return summed / m.sum(1).clamp(min=1)


class STDenseEncoder(STBackend, DenseEncoder):
    """Dense encoder for SentenceTransformer model folders."""

    heads = ("dense",)
    role = "dense"

    def __init__(self, spec: ModelSpec, device="cpu", *, source: str | None = None, budget_store=None,
                 token_budget: int | None = None, window_items: int = DEFAULT_WINDOW_ITEMS, **engine_options):
        path = source or spec.resolve_source()
        super().__init__(spec, device, source=path, budget_store=budget_store, token_budget=token_budget,
                         window_items=window_items, **engine_options)
        loaded = self.replicas[0].model
        self.dim = int(loaded.dim)
        if spec.dim is not None and spec.dim != self.dim:
            dim = self.dim
            self.close()
            raise EncoderError(
                f"model {spec.name}: registry dim {spec.dim} but {path} produces {dim}-d vectors; fix `dim` in the registry"
            )
        # We pool ourselves for Transformer -> Pooling -> [Normalize]; anything else runs through the
        # model's own modules (still on the device, padded).
        self.pooling_mode = loaded.pooling_mode
        if loaded.after_transformer is None:
            self.enable_fast(lambda hf: hf)
        else:
            for r in self.replicas:
                r.parts["after_transformer"] = r.model.after_transformer

    def forward(self, replica: Replica, batch: Batch) -> tuple[torch.Tensor, ...]:
        if replica.fast is not None:
            emb = pool_unpadded(self.fast_hidden(replica, batch), batch.inputs["cu_seqlens"], self.pooling_mode)
            return (F.normalize(emb, p=2, dim=-1),)
        hidden = self.padded_hidden(replica, batch)
        modules = replica.parts.get("after_transformer")
        if modules is None:
            emb = pool(hidden, batch.inputs["attention_mask"], self.pooling_mode)
        else:
            features = {"token_embeddings": hidden, **batch.inputs}
            for m in modules:
                features = m(features)
            emb = features["sentence_embedding"].float()
        return (F.normalize(emb, p=2, dim=-1),)
