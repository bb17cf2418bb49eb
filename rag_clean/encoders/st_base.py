"""Loading shared by the sentence-transformers backends (dense, sparse, rerank).

Model folders load through rag_clean.encoders.model_load (transformers alone where the folder's
shape allows, else sentence-transformers), so the folder's pooling / normalize / activation config is
honoured; batches run through `rag_clean.encoders.runner`. Where the architecture allows, the
transformer runs unpadded through `FastBert` over the same weights.
"""

from __future__ import annotations

import time
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
from rag_clean.encoders.model_load import LoadedModel, load_model
from rag_clean.encoders.runner import Batch, Replica, Runner, RunnerEncoder
from rag_clean.encoders.tokenize import DEFAULT_WINDOW_ITEMS, Tokenizer
from rag_clean.config.registry import ModelSpec


class STBackend(RunnerEncoder):
    """Loads one copy of a model folder per device (rag_clean.encoders.model_load) and the runner over them."""

    role = ""  # "dense" | "sparse" | "rerank": how model_load reads the folder

    def __init__(self, spec: ModelSpec, device, *, source: str,
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
        replicas = [self._load(d) for d in devices]
        first: LoadedModel = replicas[0].model
        hf = first.hf
        self.config = hf.config
        self.loader, self.loader_reason = first.loader, first.reason  # which loader ran, and why not the light one
        self.max_length = effective_max_length(spec, hf.config, first.max_seq_length)
        if first.tokenizer is None:
            raise EncoderError(f"model {spec.name}: {source} has no tokenizer")
        self.tokenizer = Tokenizer(first.tokenizer, self.max_length, lowercase=first.do_lower_case,
                                   with_type_ids=with_type_ids)
        self.stats = EncodeStats(model=spec.name, backend="sentence-transformers",
                                 device=",".join(str(d) for d in devices), dtype=dtype_name(self.dtype))
        self.unpadded = self.varlen = False
        self.runner = Runner(self, replicas, self.tokenizer, self.stats, token_budget=token_budget,
                             budget_store=budget_store,
                             bytes_per_token=bytes_per_token(hf.config, self.dtype, extra_width_per_token),
                             window_items=window_items)
        self.stats.load_seconds = time.perf_counter() - t0

    def _load(self, device: torch.device) -> Replica:
        loaded = load_model(self.source, self.role)
        # Only the transformer runs in half precision; pooling / dense heads stay as loaded.
        place(loaded.module, self.dtype, device, cast=loaded.hf)
        return Replica(device, loaded, loaded.hf)

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
