"""Inference-only forward for BERT-family encoders over the Hugging Face module's own weights.

Why: the HF module pads every batch to its longest row and runs separate Q/K/V projections.
Here tokens stay unpadded ([tokens, hidden], no pad rows anywhere), Q/K/V is one fused matmul,
and attention is variable-length flash attention over cumulative sequence lengths (CUDA). On
CPU (tests, small runs) attention pads per batch and uses SDPA with a mask, same math.

With the `compile` setting at `static` the post-attention and FFN blocks run under torch.compile with
static shapes, each batch padded to a fixed token bucket (rag_clean.encoders.static_shapes).

Covers BertModel-shaped encoders (BERT, RoBERTa, XLM-RoBERTa: absolute positions, post-LN,
GELU). Anything else returns None from `FastBert.build` and the caller keeps the HF module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rag_clean.config.settings import process_setting
from rag_clean.encoders.device import position_offset
from rag_clean.encoders.static_shapes import COMPILE_MODES, bucket_for, bucket_ladder, compile_static, pad_to_bucket

SUPPORTED_TYPES = ("bert", "roberta", "xlm-roberta")


def _varlen_fn():
    """The best variable-length attention this torch has on CUDA, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10

        return "varlen_attn", varlen_attn
    except Exception:
        pass
    if hasattr(torch.ops.aten, "_flash_attention_forward"):
        return "aten_flash", torch.ops.aten._flash_attention_forward
    return None


class FastBert:
    """Holds fused views of an HF BERT-family encoder's weights; `forward` takes unpadded tokens."""

    def __init__(self, encoder: torch.nn.Module, config, *, attention: str = "auto", compile: str = "off",
                 bucket_top: int | None = None):
        """compile: "off" (eager) or "static" (epilogues compiled per token bucket, see static_shapes);
        bucket_top anchors the bucket ladder, normally the runner's token budget (None: powers of two)."""
        emb = encoder.embeddings
        self.config = config
        self.position_offset = position_offset(config)
        self.word = emb.word_embeddings.weight
        self.pos = emb.position_embeddings.weight
        tt = getattr(emb, "token_type_embeddings", None)
        self.type_emb = tt.weight if tt is not None else None
        self.emb_ln = (emb.LayerNorm.weight, emb.LayerNorm.bias, emb.LayerNorm.eps)
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.layers = []
        for layer in encoder.encoder.layer:
            att = layer.attention
            q, k, v = att.self.query, att.self.key, att.self.value
            self.layers.append({
                "wqkv": torch.cat([q.weight, k.weight, v.weight], 0).detach(),
                "bqkv": torch.cat([q.bias, k.bias, v.bias], 0).detach(),
                "wo": att.output.dense.weight, "bo": att.output.dense.bias,
                "ln1": (att.output.LayerNorm.weight, att.output.LayerNorm.bias, att.output.LayerNorm.eps),
                "wi": layer.intermediate.dense.weight, "bi": layer.intermediate.dense.bias,
                "wo2": layer.output.dense.weight, "bo2": layer.output.dense.bias,
                "ln2": (layer.output.LayerNorm.weight, layer.output.LayerNorm.bias, layer.output.LayerNorm.eps),
            })
        self.device = self.word.device
        varlen = _varlen_fn() if self.device.type == "cuda" else None
        if attention == "padded" or varlen is None:
            self.attention = "padded_sdpa"
            self._varlen = None
        else:
            self.attention, self._varlen = varlen
        self._contiguous_qkv = False
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        self.compile = compile
        self.ladder = bucket_ladder(bucket_top) if bucket_top else None
        self.buckets_used: set[int] = set()  # the token counts the compiled epilogues have seen
        self._post_attn = _post_attn
        self._ffn = _ffn
        if compile == "static":
            # Attention stays outside the graph (flash varlen / padded SDPA run as they are).
            self._post_attn = compile_static(_post_attn, self.ladder)
            self._ffn = compile_static(_ffn, self.ladder)

    @staticmethod
    def supported(config) -> bool:
        return (
            getattr(config, "model_type", None) in SUPPORTED_TYPES
            and getattr(config, "position_embedding_type", "absolute") in (None, "absolute")
            and getattr(config, "hidden_act", None) == "gelu"
            and not getattr(config, "is_decoder", False)
            and not getattr(config, "add_cross_attention", False)
        )

    @classmethod
    def build(cls, encoder: torch.nn.Module | None, config, **kwargs) -> "FastBert | None":
        if not process_setting("fast_bert") or encoder is None or not cls.supported(config):
            return None
        if not (hasattr(encoder, "embeddings") and hasattr(encoder, "encoder")):
            return None
        return cls(encoder, config, **kwargs)

    @property
    def varlen(self) -> bool:
        """Attention runs over the concatenated rows (False: it pads them to the longest row)."""
        return self._varlen is not None

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def position_ids(self, within: torch.Tensor) -> torch.Tensor:
        return within + self.position_offset if self.position_offset else within

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """[tokens] ids (rows concatenated) -> [tokens, hidden] last hidden states."""
        if self.compile == "off":
            return self._forward(input_ids, position_ids, token_type_ids, cu_seqlens, max_seqlen)
        n = input_ids.shape[0]
        bucket = bucket_for(n, self.ladder)
        self.buckets_used.add(bucket)
        padded = pad_to_bucket(input_ids, position_ids, token_type_ids, cu_seqlens, max_seqlen, bucket)
        return self._forward(*padded)[:n]

    def precompile(self, row_tokens: int = 128) -> list[int]:
        """Compile every rung of the ladder now (one all-padding batch each); returns the rungs. For
        measuring compile time apart from steady state; the product compiles a rung when a batch first
        needs it. Runs under inference_mode, as the runner does (dynamo guards on the grad mode)."""
        if self.compile == "off" or not self.ladder:
            return []
        row = max(1, min(row_tokens, self.pos.shape[0] - self.position_offset))
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        cu = torch.zeros(1, dtype=torch.int32, device=self.device)
        with torch.inference_mode():
            for rung in self.ladder:
                self.buckets_used.add(rung)
                self._forward(*pad_to_bucket(empty, empty, None, cu, row, rung))
        return list(self.ladder)

    def _forward(self, input_ids, position_ids, token_type_ids, cu_seqlens, max_seqlen):
        x = F.embedding(input_ids, self.word) + F.embedding(self.position_ids(position_ids), self.pos)
        if self.type_emb is not None:
            x = x + (F.embedding(token_type_ids, self.type_emb) if token_type_ids is not None else self.type_emb[0])
        w, b, eps = self.emb_ln
        x = F.layer_norm(x, (x.shape[-1],), w, b, eps)
        padded_index = None
        if self._varlen is None:
            padded_index = _padding_index(cu_seqlens, max_seqlen)
        for p in self.layers:
            qkv = F.linear(x, p["wqkv"], p["bqkv"])
            attn = self._attend(qkv, cu_seqlens, max_seqlen, padded_index)
            x = self._post_attn(x, attn, p["wo"], p["bo"], *p["ln1"])
            x = self._ffn(x, p["wi"], p["bi"], p["wo2"], p["bo2"], *p["ln2"])
        return x

    def _attend(self, qkv, cu_seqlens, max_seqlen, padded_index):
        n = qkv.shape[0]
        h, dh = self.heads, self.head_dim
        q, k, v = qkv.view(n, 3, h, dh).unbind(1)
        scale = 1.0 / math.sqrt(dh)
        if self.attention == "varlen_attn":
            if self._contiguous_qkv:
                q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            try:
                out = self._varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)
            except RuntimeError:
                if self._contiguous_qkv:
                    raise
                # Some builds want dense [tokens, heads, dim] inputs rather than strided views of qkv.
                self._contiguous_qkv = True
                return self._attend(qkv, cu_seqlens, max_seqlen, padded_index)
            if isinstance(out, tuple):
                out = out[0]
            return out.reshape(n, h * dh)
        if self.attention == "aten_flash":
            out = self._varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, False, False,
                               scale=scale)[0]
            return out.reshape(n, h * dh)
        # Padded SDPA: scatter rows into [b, L], attend with a key mask, gather real tokens back.
        rows, width = padded_index["shape"]
        flat_pos = padded_index["flat_pos"]
        def pad(t):
            buf = t.new_zeros(rows * width, h, dh)
            buf[flat_pos] = t
            return buf.view(rows, width, h, dh).transpose(1, 2)
        mask = padded_index["mask"]
        out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, scale=scale)
        return out.transpose(1, 2).reshape(rows * width, h * dh)[flat_pos]


def _padding_index(cu_seqlens: torch.Tensor, max_seqlen: int) -> dict:
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    rows = lengths.shape[0]
    n = int(cu_seqlens[-1])
    row_of = torch.repeat_interleave(torch.arange(rows, device=cu_seqlens.device), lengths, output_size=n)
    within = torch.arange(n, device=cu_seqlens.device) - cu_seqlens[:-1].long()[row_of]
    flat_pos = row_of * max_seqlen + within
    key_ok = torch.arange(max_seqlen, device=cu_seqlens.device)[None, :] < lengths[:, None]
    return {"shape": (rows, max_seqlen), "flat_pos": flat_pos, "mask": key_ok[:, None, None, :]}


def _post_attn(x, attn, wo, bo, ln_w, ln_b, eps: float):
    return F.layer_norm(x + F.linear(attn, wo, bo), (x.shape[-1],), ln_w, ln_b, eps)


def _ffn(x, wi, bi, wo2, bo2, ln_w, ln_b, eps: float):
    inner = F.gelu(F.linear(x, wi, bi))
    return F.layer_norm(x + F.linear(inner, wo2, bo2), (x.shape[-1],), ln_w, ln_b, eps)


def segment_ids(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Row index of every token of a concatenated batch."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(lengths.shape[0], device=cu_seqlens.device), lengths,
                                   output_size=n_tokens)


def pool_unpadded(hidden: torch.Tensor, cu_seqlens: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool [tokens, d] over each row's span, in float32."""
    rows = cu_seqlens.shape[0] - 1
    starts = cu_seqlens[:-1].long()
    ends = cu_seqlens[1:].long()
    if mode == "cls":
        return hidden[starts].float()
    if mode == "lasttoken":
        return hidden[ends - 1].float()
    seg = segment_ids(cu_seqlens, hidden.shape[0])
    if mode == "max":
        out = torch.full((rows, hidden.shape[1]), float("-inf"), device=hidden.device, dtype=torch.float32)
        return out.index_reduce_(0, seg, hidden.float(), "amax", include_self=True)
    sums = torch.zeros(rows, hidden.shape[1], device=hidden.device, dtype=torch.float32)
    sums.index_add_(0, seg, hidden.float())
    return sums / (ends - starts).clamp(min=1).unsqueeze(1).float()
