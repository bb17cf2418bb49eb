"""SPLADE from sentence-transformers SparseEncoder folders: log(1 + relu(MLM logits)) max-pooled
over real tokens, top-k on the device."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from rag_clean.encoders.base import Encoded, EncoderError, SparseEncoder
from rag_clean.encoders.fast_bert import segment_ids
from rag_clean.encoders.runner import Batch, Replica
from rag_clean.encoders.st_base import STBackend
from rag_clean.encoders.tokenize import DEFAULT_WINDOW_ITEMS
from rag_clean.config.settings import process_setting
from rag_clean.config.registry import ModelSpec

# Bytes of vocab-wide activations computed at once: no [tokens, vocab] tensor is ever larger.
SPLADE_CHUNK_BYTES = 256 * 1024 * 1024
# Vocabulary slice of the MLM head: measured fastest of 1024 / 4096 / token chunks on SPLADE-tiny on the CPU, and
# of 1024 / 4096 / 8192 / full logits on bge-base's shape on an H100 (1.31M vs 1.04M tokens/s, VRAM 7.9 -> 2.8 GB,
# the same top-10 terms): docs/performance.md, Round 3.
CPU_VOCAB_SLICE = 1024
CUDA_VOCAB_SLICE = 4096


class STSparseEncoder(STBackend, SparseEncoder):
    """SPLADE: log(1 + relu(MLM logits)) max-pooled over real tokens, top-k on the device."""

    heads = ("lexical",)
    role = "sparse"

    def __init__(self, spec: ModelSpec, device="cpu", *, source: str | None = None, budget_store=None,
                 token_budget: int | None = None, window_items: int = DEFAULT_WINDOW_ITEMS, **engine_options):
        path = source or spec.resolve_source()
        super().__init__(spec, device, source=path, budget_store=budget_store, token_budget=token_budget,
                         window_items=window_items, **engine_options)
        loaded = self.replicas[0].model
        hf = self.replicas[0].hf
        self.vocab_size = int(hf.config.vocab_size)
        if loaded.splade is None:
            self.close()
            raise EncoderError(f"model {spec.name}: {path} is not a SPLADE model (no SpladePooling module)")
        strategy, activation = loaded.splade
        if strategy != "max" or activation not in ("relu", "log1p_relu"):
            self.close()
            raise EncoderError(
                f"model {spec.name}: SPLADE pooling {strategy!r}/{activation!r} "
                "is not supported (max with relu or log1p_relu)"
            )
        if not type(hf).__name__.endswith("ForMaskedLM"):
            name = type(hf).__name__
            self.close()
            raise EncoderError(f"model {spec.name}: {path} loads as {name}, not a masked-LM model; SPLADE needs the MLM head")
        self.double_log = activation == "log1p_relu"
        # BERT-family MLM: run the encoder, then the MLM head over real tokens only, in chunks.
        self.split_head = hasattr(hf, "cls") and hasattr(hf, "base_model")
        self.top_k = min(int(spec.top_k), self.vocab_size)
        # Unpadded batches pool with a segment max over contiguous rows; RAG_CLEAN_SPLADE_SEGMENT_MAX=0
        # switches to the scatter-max (index_reduce_) that padded batches use, for comparison.
        self.segment_max = process_setting("splade_segment_max")
        if self.split_head:
            self.enable_fast(lambda m: m.base_model)
        # Vocabulary slices of the MLM decoder per pass (0: off, rows chunked over tokens as before). Each slice's
        # logits [tokens, slice] are max-pooled at once, so the [tokens, vocab] logits never exist whole and a
        # slice small enough stays in cache; the head's transform runs once per batch, not once per chunk.
        chosen = process_setting("splade_vocab_slice")
        on_cpu = all(r.device.type == "cpu" for r in self.replicas)
        self.vocab_slice = (CPU_VOCAB_SLICE if on_cpu else CUDA_VOCAB_SLICE) if chosen is None else chosen
        self.sliced_head = self.vocab_slice > 0 and _decoder_parts(hf) is not None

    def _activate_pooled(self, pooled_logits: torch.Tensor) -> torch.Tensor:
        """Activation applied after the max: log1p(relu(.)) is monotone, so max-then-activate equals
        activate-then-max, and the elementwise passes run over [rows, vocab], not [tokens, vocab]."""
        x = torch.relu(pooled_logits.float()).log1p_()
        return x.log1p_() if self.double_log else x

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        # log1p(relu(x)) in the logits' dtype: max-pooling commutes with this monotone map, and the
        # fp32 copy of a [chunk, vocab] tensor would double the chunk's memory traffic.
        x = torch.relu_(logits).log1p_()
        return x.log1p_() if self.double_log else x

    def _pool_tokens(self, hf, flat: torch.Tensor, row_of: torch.Tensor, rows: int) -> torch.Tensor:
        """Max over each row's tokens of the activated MLM logits, [rows, vocab], chunked over tokens."""
        pooled = torch.zeros(rows, self.vocab_size, dtype=flat.dtype, device=flat.device)
        step = max(1, SPLADE_CHUNK_BYTES // (self.vocab_size * flat.element_size()))
        for s in range(0, flat.shape[0], step):
            act = self._activate(hf.cls(flat[s:s + step]))
            with warnings.catch_warnings():
                # index_reduce_ (scatter-max over tokens) is flagged beta; its result is what we test.
                warnings.simplefilter("ignore", UserWarning)
                pooled.index_reduce_(0, row_of[s:s + step], act, "amax", include_self=True)
        return pooled

    def _pool_rows(self, hf, flat: torch.Tensor, cu: torch.Tensor, lengths: np.ndarray) -> torch.Tensor:
        """Same as _pool_tokens for unpadded batches, chunked over whole rows: each chunk's rows are
        contiguous token spans, so a segment max replaces the scatter (no atomics, no [b, vocab] init)."""
        rows = len(lengths)
        step = max(1, SPLADE_CHUNK_BYTES // (self.vocab_size * flat.element_size()))
        dev_lengths = (cu[1:] - cu[:-1]).long()
        host_cu = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(lengths, out=host_cu[1:])
        parts = []
        r0 = 0
        while r0 < rows:
            # as many whole rows as fit `step` tokens (at least one)
            r1 = max(r0 + 1, int(np.searchsorted(host_cu, host_cu[r0] + step, side="right")) - 1)
            r1 = min(r1, rows)
            logits = hf.cls(flat[host_cu[r0]:host_cu[r1]])
            parts.append(torch.segment_reduce(logits, "max", lengths=dev_lengths[r0:r1], axis=0))
            r0 = r1
        return self._activate_pooled(torch.cat(parts) if len(parts) > 1 else parts[0])

    def _pool_vocab_slices(self, hf, flat: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        """_pool_rows computed one vocabulary slice at a time: [rows, vocab] activated maxima."""
        transform, weight, bias = _decoder_parts(hf)
        h = transform(flat)
        lengths = (cu[1:] - cu[:-1]).long()
        pooled = torch.empty(len(lengths), self.vocab_size, dtype=h.dtype, device=h.device)
        for v0 in range(0, self.vocab_size, self.vocab_slice):
            v1 = min(v0 + self.vocab_slice, self.vocab_size)
            logits = torch.nn.functional.linear(h, weight[v0:v1], None if bias is None else bias[v0:v1])
            pooled[:, v0:v1] = torch.segment_reduce(logits, "max", lengths=lengths, axis=0)
        return self._activate_pooled(pooled)

    def forward(self, replica: Replica, batch: Batch) -> tuple[torch.Tensor, ...]:
        hf = replica.hf
        b = len(batch.rows)
        x = batch.inputs
        if replica.fast is not None:
            hidden = self.fast_hidden(replica, batch)
            if self.sliced_head:
                pooled = self._pool_vocab_slices(hf, hidden, x["cu_seqlens"])
            elif self.segment_max:
                pooled = self._pool_rows(hf, hidden, x["cu_seqlens"], batch.lengths)
            else:
                pooled = self._pool_tokens(hf, hidden, segment_ids(x["cu_seqlens"], hidden.shape[0]), b)
        elif self.split_head:
            mask = x["attention_mask"].bool()
            hidden = self.padded_hidden(replica, batch, hf.base_model)
            row_of = torch.arange(b, device=replica.device).repeat_interleave(mask.sum(1))
            pooled = self._pool_tokens(hf, hidden[mask], row_of, b)  # real tokens only
        else:
            width = x["input_ids"].shape[1]
            pooled = torch.zeros(b, self.vocab_size, dtype=torch.float32, device=replica.device)
            step = max(1, SPLADE_CHUNK_BYTES // (width * self.vocab_size * 4))
            for s in range(0, b, step):
                part = {k: v[s:s + step] for k, v in x.items()}
                logits = hf(**part, return_dict=True).logits.float()
                act = self._activate(logits) * part["attention_mask"].unsqueeze(-1)
                pooled[s:s + step] = act.amax(1)
        weights, terms = torch.topk(pooled, self.top_k, dim=1, sorted=True)
        return terms.to(torch.int32), weights.float()

    def post(self, batch: Batch, outputs: tuple[np.ndarray, ...]) -> Encoded:
        terms, weights = outputs
        rows = []
        for t, w in zip(terms, weights):
            keep = w > 0
            rows.append((np.ascontiguousarray(t[keep]), np.ascontiguousarray(w[keep])))
        return Encoded(batch.indices, lexical=rows)

    def decode_terms(self, term_ids: Sequence[int]) -> list[str]:
        return self.tokenizer.hf.convert_ids_to_tokens([int(t) for t in term_ids])


def _decoder_parts(hf):
    """(transform, decoder weight [vocab, hidden], bias [vocab] or None) of a BERT-style MLM head, or None."""
    pred = getattr(getattr(hf, "cls", None), "predictions", None)
    decoder = getattr(pred, "decoder", None)
    if pred is None or decoder is None or not hasattr(pred, "transform"):
        return None
    return pred.transform, decoder.weight, decoder.bias
