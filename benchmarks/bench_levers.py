"""Encode-path levers on one fixed batch (issue 13 item 4): what each would buy before it is built in.

For each shape (random-init BertModel, bf16, on CUDA) one batch of `--tokens` real-length rows (lengths drawn
like the synthetic corpus: mean ~230, max 512) runs through rag_clean's FastBert forward + mean pooling:

- eager:          FastBert as the product runs it (varlen attention, cuBLAS linears, unfused epilogues);
- cuda_graph:     the same forward captured once and replayed (what fixed-size token buckets would buy:
                  no Python or kernel-launch time; the batch is already one bucket here);
- compile_static: the post-attention and FFN blocks under torch.compile with static shapes (inductor fuses
                  bias + GELU and residual + LayerNorm into the matmul epilogues / one kernel);
- fp8_rowwise:    every linear as torch._scaled_mm in float8_e4m3 with per-row activation scales and
                  per-output-channel weight scales, bf16 out (quantization compiled, static shapes);
- flash_attention_3: whether an FA3 build is importable (flash_attn_interface); not timed without one.

Reports tokens/s, the ratio to eager, and the worst-row cosine of the pooled vectors against a float32
forward of the same weights (padded SDPA: flash kernels have no fp32). Writes JSON (--out).
  python benchmarks/bench_levers.py --shapes minilm-l6,bge-base,bge-large --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_encode import PEAK_TFLOPS_BF16, SHAPES, flops_per_token  # noqa: E402
from rag_clean.encoders import fast_bert  # noqa: E402
from rag_clean.encoders.fast_bert import FastBert, pool_unpadded  # noqa: E402

FP8_MAX = 448.0  # largest float8_e4m3fn value


def batch_lengths(tokens: int, seed: int) -> np.ndarray:
    """Row lengths summing to exactly `tokens` (one fixed bucket), each in [16, 512]."""
    rng = np.random.default_rng(seed)
    lengths = []
    while tokens - sum(lengths) > 512:
        lengths.append(int(np.clip(rng.normal(230, 90), 16, 512)))
    lengths.append(tokens - sum(lengths))
    return np.asarray(lengths, dtype=np.int64)


def inputs_for(lengths: np.ndarray, vocab: int, device: str) -> dict:
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    n = int(cu[-1])
    ids = np.random.default_rng(1).integers(1000, vocab, n)
    within = np.arange(n) - np.repeat(cu[:-1], lengths)
    return {"input_ids": torch.from_numpy(ids).to(device), "position_ids": torch.from_numpy(within).to(device),
            "token_type_ids": None, "cu_seqlens": torch.from_numpy(cu).to(device), "max_seqlen": int(lengths.max())}


def pooled(fb: FastBert, x: dict) -> torch.Tensor:
    hidden = fb.forward(x["input_ids"], x["position_ids"], x["token_type_ids"], x["cu_seqlens"], x["max_seqlen"])
    return F.normalize(pool_unpadded(hidden, x["cu_seqlens"], "mean"), dim=-1)


def time_it(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn()
    torch.cuda.synchronize()
    del out
    return (time.perf_counter() - t0) / iters


# --- FP8: rowwise-scaled float8 linears -------------------------------------------------------

def quantize_rows(x: torch.Tensor):
    scale = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def fp8_weight(w: torch.Tensor):
    q, scale = quantize_rows(w)          # per output channel
    return q.t(), scale.t().contiguous()  # column-major [K, N] and [1, N], as _scaled_mm wants


class Fp8Linears:
    """F.linear over bf16 activations with weights quantized once; swaps fast_bert's F.linear while active."""

    def __init__(self, fb: FastBert):
        self.weights = {}
        for p in fb.layers:
            for w in ("wqkv", "wo", "wi", "wo2"):
                self.weights[p[w].data_ptr()] = fp8_weight(p[w])
        self.quantize = torch.compile(quantize_rows, dynamic=False)
        self.real_linear = F.linear

    def linear(self, x, w, b=None):
        entry = self.weights.get(w.data_ptr())
        if entry is None:
            return self.real_linear(x, w, b)
        xq, xs = self.quantize(x)
        return torch._scaled_mm(xq, entry[0], scale_a=xs, scale_b=entry[1], bias=b, out_dtype=torch.bfloat16)

    def __enter__(self):
        fast_bert.F.linear = self.linear  # fast_bert calls F.linear through its module's F
        return self

    def __exit__(self, *exc):
        fast_bert.F.linear = self.real_linear


def flash_attention_3() -> str:
    try:
        import flash_attn_interface  # noqa: F401  (the FA3 package's module)

        return "importable"
    except Exception as exc:
        return f"not available: {type(exc).__name__}: {exc}"


def bench_shape(shape: str, args, log) -> dict:
    from transformers import BertConfig, BertModel

    layers, hidden, heads, inter, _ = SHAPES[shape]
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=inter, max_position_embeddings=512)
    torch.manual_seed(args.seed)
    model = BertModel(cfg, add_pooling_layer=False).to("cuda").eval()
    lengths = batch_lengths(args.tokens, args.seed)
    x = inputs_for(lengths, cfg.vocab_size, "cuda")
    res = {"shape": shape, "tokens": args.tokens, "rows": len(lengths), "ceiling_tokens_per_s":
           PEAK_TFLOPS_BF16 * 1e12 / flops_per_token(shape, lengths)}
    with torch.inference_mode():
        ref = pooled(FastBert(model, cfg, attention="padded"), x).float()  # float32 weights, padded SDPA
        model.to(torch.bfloat16)
        fb = FastBert(model, cfg)

        def record(name, fn, note=""):
            try:
                out = fn().float()
                cos = float((out * ref).sum(-1).min())
                seconds = time_it(fn, args.iters)
                entry = {"tokens_per_s": args.tokens / seconds, "ms_per_batch": seconds * 1e3, "worst_cos_vs_fp32": cos}
                if "eager" in res:
                    entry["ratio_vs_eager"] = entry["tokens_per_s"] / res["eager"]["tokens_per_s"]
                entry["fraction_of_ceiling"] = entry["tokens_per_s"] / res["ceiling_tokens_per_s"]
                res[name] = entry
                log(f"  {shape:10s} {name:15s} {entry['tokens_per_s'] / 1e6:6.2f}M tok/s  "
                    f"x{entry.get('ratio_vs_eager', 1.0):5.2f}  {entry['fraction_of_ceiling']:6.1%} ceil  cos>={cos:.5f} {note}")
            except Exception as exc:  # one lever failing must not cost the others
                res[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
                log(f"  {shape:10s} {name:15s} FAILED {res[name]['error']}")

        record("eager", lambda: pooled(fb, x), f"attention={fb.attention}")

        def graphed():
            static = {}
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    pooled(fb, x)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static["out"] = pooled(fb, x)
            return lambda: (graph.replay(), static["out"])[1]
        try:
            replay = graphed()
            record("cuda_graph", replay)
        except Exception as exc:
            res["cuda_graph"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            log(f"  {shape:10s} cuda_graph      FAILED {res['cuda_graph']['error']}")

        fbc = FastBert(model, cfg)
        fbc._post_attn = torch.compile(fast_bert._post_attn, dynamic=False)
        fbc._ffn = torch.compile(fast_bert._ffn, dynamic=False)
        record("compile_static", lambda: pooled(fbc, x))

        if torch.cuda.get_device_capability()[0] >= 9:
            lin = Fp8Linears(fb)

            def fp8():
                with lin:
                    return pooled(fb, x)
            record("fp8_rowwise", fp8, "(float8_e4m3fn, rowwise scales)")
        else:
            res["fp8_rowwise"] = {"error": "needs compute capability >= 9.0"}
    del model, fb
    torch.cuda.empty_cache()
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="minilm-l6,bge-base,bge-large")
    p.add_argument("--tokens", type=int, default=65536, help="tokens in the fixed batch (one bucket)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_levers needs a CUDA device", file=sys.stderr)
        return 2
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    report = {"benchmark": "levers", "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "python": platform.python_version(), "command": " ".join(sys.argv),
              "tokens_per_batch": args.tokens, "flash_attention_3": flash_attention_3(), "results": []}
    log(f"device {report['device']}; torch {torch.__version__}; batch {args.tokens} tokens; FA3 {report['flash_attention_3']}")
    for shape in [s for s in args.shapes.split(",") if s]:
        report["results"].append(bench_shape(shape, args, log))
    report["log"] = lines
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
