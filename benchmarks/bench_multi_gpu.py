"""Multi-GPU scaling of the dense encode: one replica per device (rag_clean.encoders.runner), 1..N GPUs.

For each shape (bge-base, bge-large by default) and each GPU count in --gpus (default: 1, 2, 4, 8 up to
what the machine has), encodes the same seeded synthetic corpus (mean ~230 tokens) with a random-init
encoder of that shape through `STDenseEncoder(spec, "cuda:0,...,cuda:N-1")` (what the dense stage loads), streaming
into a memory-mapped matrix as the pipeline does, and reports tokens/s, scaling efficiency
(tokens/s on N / (N x tokens/s on 1)) and the largest difference from the 1-GPU vectors. No Dagster.

  python benchmarks/bench_multi_gpu.py --chunks 200000 --out results.json
  python benchmarks/bench_multi_gpu.py --chunks 20000 --gpus 1           # a dry run on one card
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_encode import build_models, find_tokenizer_dir, spec_for, synthetic_corpus  # noqa: E402
from rag_clean.encoders.st_dense import STDenseEncoder  # noqa: E402


def encode(spec, texts, devices: list[str], out: Path) -> dict:
    encoder = STDenseEncoder(spec, ",".join(devices))
    matrix = np.lib.format.open_memmap(str(out), mode="w+", dtype=np.float32, shape=(len(texts), encoder.dim))
    for d in devices:
        torch.cuda.synchronize(d)
    t0 = time.perf_counter()
    for batch in encoder.encode(texts):
        matrix[batch.rows] = batch.dense
    for d in devices:
        torch.cuda.synchronize(d)
    seconds = time.perf_counter() - t0
    stats = encoder.stats
    encoder.close()
    matrix.flush()
    return {"gpus": len(devices), "seconds": seconds, "tokens": stats.tokens, "tokens_per_s": stats.tokens / seconds,
            "batches": len(stats.batches), "tokenize_seconds": stats.tokenize_seconds,
            "oom_mitigations": len(stats.oom_mitigations)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=200_000)
    p.add_argument("--shapes", default="bge-base,bge-large")
    p.add_argument("--gpus", default="", help="comma list of GPU counts (default 1,2,4,8 up to the machine's)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs CUDA", file=sys.stderr)
        return 2
    available = torch.cuda.device_count()
    counts = [int(c) for c in args.gpus.split(",") if c] or [n for n in (1, 2, 4, 8) if n <= available]
    counts = [n for n in counts if n <= available]
    tokenizer_dir = find_tokenizer_dir()
    texts, _ = synthetic_corpus(tokenizer_dir, args.chunks)
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0), "gpus_available": available,
              "torch": torch.__version__, "python": platform.python_version(), "chunks": len(texts),
              "command": " ".join(sys.argv), "results": []}
    print(f"{available} x {report['device']}; {len(texts)} chunks; GPU counts {counts}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shapes = [s for s in args.shapes.split(",") if s]
        models = build_models(tmp / "models", tokenizer_dir, [("dense", s) for s in shapes], "cuda:0")
        for shape in shapes:
            spec = spec_for("dense", shape, models[("dense", shape)], args.max_length)
            # Warm-up on a slice: CUDA context, kernels and the budget sizing are not the measurement.
            encode(spec, texts[:2000], [f"cuda:{i}" for i in range(max(counts))], tmp / "warm.npy")
            base, base_vectors = None, None
            for n in counts:
                out = tmp / f"{shape}-{n}.npy"
                row = encode(spec, texts, [f"cuda:{i}" for i in range(n)], out)
                vectors = np.load(out, mmap_mode="r")
                if base is None:
                    base, base_vectors = row, np.array(vectors)
                row["shape"] = shape
                row["efficiency"] = row["tokens_per_s"] / (n * base["tokens_per_s"])
                row["max_abs_diff_vs_1gpu"] = float(np.abs(np.asarray(vectors) - base_vectors).max())
                row["identical_to_1gpu"] = bool(np.array_equal(np.asarray(vectors), base_vectors))
                report["results"].append(row)
                print(f"  {shape:10s} {n} GPU(s): {row['tokens_per_s'] / 1e6:.2f}M tok/s, efficiency "
                      f"{row['efficiency']:.1%}, max |diff| vs 1 GPU {row['max_abs_diff_vs_1gpu']:.2e}"
                      f"{' (identical)' if row['identical_to_1gpu'] else ''}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
