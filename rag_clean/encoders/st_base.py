"""Loading shared by the sentence-transformers backends (dense, sparse, rerank).

Models load through sentence-transformers, so the model folder's pooling / normalize /
activation config is honoured; batches run through `rag_clean.encoders.runner`. Where the
architecture allows, the transformer runs unpadded through `FastBert` over the same weights.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from rag_clean.config.settings import process_setting
from rag_clean.encoders.base import EncodeStats, EncoderError
from rag_clean.encoders.budget import BudgetStore
from rag_clean.encoders.device import (
    bytes_per_token,
    dtype_name,
    effective_max_length,
    parse_devices,
    place,
    resolve_dtype,
)
from rag_clean.encoders.fast_bert import FastBert
from rag_clean.encoders.runner import Batch, Replica, Runner, RunnerEncoder
from rag_clean.encoders.tokenize import DEFAULT_WINDOW_ITEMS, Tokenizer
from rag_clean.config.registry import ModelSpec


def transformer_module(st_model):
    """(the sentence-transformers Transformer module, the Hugging Face model inside it)."""
    first = st_model[0]
    hf = getattr(first, "auto_model", None) or getattr(first, "model", None)
    if hf is None:
        raise EncoderError(f"{type(first).__name__} has no Hugging Face model (auto_model)")
    return first, hf


class STBackend(RunnerEncoder):
    """Loads one sentence-transformers model per device and the runner over them."""

    def __init__(self, spec: ModelSpec, device, load_model: Callable[[], object], *, source: str,
                 budget_store: BudgetStore | None, token_budget: int | None, window_items: int = DEFAULT_WINDOW_ITEMS,
                 with_type_ids: bool = False, extra_width_per_token: int = 0, fast: bool = True,
                 attention: str = "auto", compile: str | None = None):
        t0 = time.perf_counter()
        # fast=False keeps the Hugging Face module (padded batches, SDPA) for every batch;
        # the benchmark uses it to measure what the fast path buys. compile None: the `compile` setting.
        compile = process_setting("compile") if compile is None else compile
        self.fast_options = {"enabled": fast, "attention": attention, "compile": compile}
        self.spec = spec
        self.source = source
        devices = parse_devices(device, spec.name)
        self.dtype = resolve_dtype(spec, devices[0])
        replicas = [self._load(load_model, d) for d in devices]
        module, hf = transformer_module(replicas[0].model)
        self.config = hf.config
        self.max_length = effective_max_length(spec, hf.config, getattr(module, "max_seq_length", None))
        hf_tok = getattr(module, "tokenizer", None)
        if hf_tok is None:
            raise EncoderError(f"model {spec.name}: {source} has no tokenizer")
        self.tokenizer = Tokenizer(hf_tok, self.max_length, lowercase=bool(getattr(module, "do_lower_case", False)),
                                   with_type_ids=with_type_ids)
        self.stats = EncodeStats(model=spec.name, backend="sentence-transformers",
                                 device=",".join(str(d) for d in devices), dtype=dtype_name(self.dtype))
        self.unpadded = self.varlen = False
        self.runner = Runner(self, replicas, self.tokenizer, self.stats, token_budget=token_budget,
                             budget_store=budget_store,
                             bytes_per_token=bytes_per_token(hf.config, self.dtype, extra_width_per_token),
                             window_items=window_items)
        self.stats.load_seconds = time.perf_counter() - t0

    def _load(self, load_model, device: torch.device) -> Replica:
        st_model = load_model()
        _, hf = transformer_module(st_model)
        # Only the transformer runs in half precision; pooling / dense heads stay as loaded.
        place(st_model, self.dtype, device, cast=hf)
        return Replica(device, st_model, hf)

    @property
    def module(self):
        """The sentence-transformers Transformer module of the first replica (None once closed)."""
        return self.replicas[0].model[0] if self.replicas else None

    def enable_fast(self, encoder_of) -> None:
        """Run unpadded through FastBert built from `encoder_of(hf)` (the BertModel part) on every
        replica, if the architecture allows it on all of them."""
        if not self.fast_options["enabled"]:
            return
        for r, controller in zip(self.replicas, self.runner.controllers):
            # The bucket ladder is anchored at the replica's starting token budget (static_shapes.bucket_ladder).
            r.fast = FastBert.build(encoder_of(r.hf), r.hf.config, attention=self.fast_options["attention"],
                                    compile=self.fast_options["compile"], bucket_top=controller.budget)
        self.unpadded = all(r.fast is not None for r in self.replicas)
        if not self.unpadded:
            for r in self.replicas:
                r.fast = None
        self.varlen = self.unpadded and all(r.fast.varlen for r in self.replicas)

    @staticmethod
    def fast_hidden(replica: Replica, batch: Batch) -> torch.Tensor:
        """[tokens, hidden] last hidden states of an unpadded batch."""
        x = batch.inputs
        return replica.fast(x["input_ids"], x["position_ids"], x.get("token_type_ids"), x["cu_seqlens"],
                            x["max_seqlen"])

    @staticmethod
    def padded_hidden(replica: Replica, batch: Batch, model: torch.nn.Module | None = None) -> torch.Tensor:
        out = (model or replica.hf)(**batch.inputs, return_dict=True)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
