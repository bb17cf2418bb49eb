"""Static-shape torch.compile for FastBert: a fixed ladder of token buckets, and padding up to a rung.

Why: compiled with dynamic shapes, FastBert's epilogues (bias + residual + LayerNorm after attention, bias +
GELU + bias + residual + LayerNorm in the FFN) lost 8-30% on an H100; with static shapes inductor fuses them
(x1.15 forward-only on bge-base). But every distinct token count is one compile, and the runner's batches
all have different counts. So each batch is padded up to one rung of a short ladder and the compiled graphs
are reused. The padding is extra dummy rows appended to cu_seqlens: attention is per row, so they never
attend to or leak into the real rows, which are sliced back out afterwards.
"""

from __future__ import annotations

import torch

COMPILE_MODES = ("off", "static")
LADDER_RUNGS = 6       # top, top/2, ..., top/32: a 131072 budget still pads a 4,100-token tail to 8192 at worst
ALIGN = 64             # rungs are multiples of 64 tokens (tensor-core friendly matmul rows)
POWER_FLOOR = 256      # the smallest bucket when no budget anchors the ladder
PAD_ROW = 128          # dummy rows are at most this long (and at most the batch's longest row)


def bucket_ladder(top: int, rungs: int = LADDER_RUNGS, align: int = ALIGN) -> tuple[int, ...]:
    """Ascending rungs top/2^k (k < rungs), each rounded up to `align`.

    Anchored at the token budget because the runner fills batches up to it: a full batch then pads by less
    than one row, only a window's last, partial batch pads more (under 2x), and an OOM halving of the budget
    lands on the next rung down, so no new shapes appear after one."""
    top = max(int(top), align)
    rungs_ = {-(-(top >> k) // align) * align for k in range(rungs) if top >> k >= align}
    return tuple(sorted(rungs_))


def bucket_for(n: int, ladder: tuple[int, ...] | None) -> int:
    """The rung a batch of `n` tokens is padded to. Above the ladder (one row longer than a shrunken
    budget) or without one: the next power of two, so the number of shapes stays logarithmic."""
    for rung in ladder or ():
        if n <= rung:
            return rung
    return max(POWER_FLOOR, 1 << max(n - 1, 0).bit_length())


def pad_to_bucket(input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                  cu_seqlens: torch.Tensor, max_seqlen: int, bucket: int):
    """Append `bucket - n` pad tokens as dummy rows of at most min(PAD_ROW, max_seqlen) tokens.

    Several short rows, not one long one: a single dummy row of (say) 60k tokens would cost quadratic
    attention and raise max_seqlen (the padded CPU path's buffer width, the flash kernel's grid) for the
    whole batch. Everything stays on the device (no host sync)."""
    n = input_ids.shape[0]
    pad = bucket - n
    if pad <= 0:
        return input_ids, position_ids, token_type_ids, cu_seqlens, max_seqlen
    row = max(1, min(PAD_ROW, max_seqlen))
    dev = input_ids.device
    ends = torch.arange(n + row, bucket + row, row, device=dev, dtype=cu_seqlens.dtype).clamp_max_(bucket)
    within = torch.arange(pad, device=dev, dtype=position_ids.dtype) % row
    ids = torch.cat([input_ids, input_ids.new_zeros(pad)])
    types = None if token_type_ids is None else torch.cat([token_type_ids, token_type_ids.new_zeros(pad)])
    return ids, torch.cat([position_ids, within]), types, torch.cat([cu_seqlens, ends]), max(max_seqlen, row)


def compile_static(fn, ladder: tuple[int, ...] | None):
    """`fn` under torch.compile with static shapes; dynamo's per-function cache made big enough for every
    rung of several models in one process (each model width is another set of shapes). Past the limit
    dynamo runs the function eagerly (a warning), never fails."""
    import torch._dynamo.config as dynamo_config

    wanted = 4 * (len(ladder or ()) + 8)  # 4 model shapes per process, plus power-of-two oversize buckets
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.7; either is accepted
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), wanted))
            break
    return torch.compile(fn, dynamic=False)
