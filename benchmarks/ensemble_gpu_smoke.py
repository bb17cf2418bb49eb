"""The exclusive dense ensemble on a real card, through the engine alone (no Dagster).

For each dense model in turn: lease a device (rag_clean.gpu.lease), run the real dense stage
(rag_clean.stages.context.run_stage of the dense stage: load -> encode -> close), release; then fuse. Prints and writes
the lease summaries (VRAM measured before / after each model, peak), the encode stats, and a second
pass of one model under a forced small memory ceiling that must back off on CUDA OOM and still give
the same vectors. Exit 0 only when every check holds.

    python benchmarks/ensemble_gpu_smoke.py --n 4000 --out /tmp/ensemble.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402

from benchmarks.bench_encode import build_models, find_tokenizer_dir, synthetic_corpus  # noqa: E402
from rag_clean.chunking import content_hash  # noqa: E402
from rag_clean.gpu.lease import GpuLeaseManager  # noqa: E402
from rag_clean.config.registry import load_registry  # noqa: E402
from rag_clean.config.plan import build_run_plan  # noqa: E402
from rag_clean.config.settings import EmbedderSettings  # noqa: E402
from rag_clean.stages.context import StageContext, run_stage  # noqa: E402
from rag_clean.stages.dense import DENSE  # noqa: E402
from rag_clean.stages.fusion import FUSION  # noqa: E402
from rag_clean.storage.layout import StorageLayout  # noqa: E402
from rag_clean.storage.embeddings import read_embeddings  # noqa: E402

REGISTRY = """
[fusion]
method = "concat"

[[models]]
name = "minilm-shape"
role = "dense"
source = "path:{minilm}"
dim = 384
max_length = 512
weight = 0.8

[[models]]
name = "bge-base-shape"
role = "dense"
source = "path:{base}"
dim = 768
max_length = 512
weight = 0.2
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--oom-fraction", type=float, default=0.02,
                        help="memory ceiling (fraction of the card) for the forced-OOM pass")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this smoke test needs a GPU", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="rag_clean_ensemble_"))
    tokenizer_dir = find_tokenizer_dir()
    texts, _ = synthetic_corpus(tokenizer_dir, args.n)
    models = build_models(work / "models", tokenizer_dir, [("dense", "minilm-l6"), ("dense", "bge-base")], "cuda")
    registry_path = work / "models.toml"
    registry_path.write_text(REGISTRY.format(minilm=models[("dense", "minilm-l6")], base=models[("dense", "bge-base")]))
    registry = load_registry(registry_path)
    chunks = pa.table({"chunk_id": [f"c{i}" for i in range(len(texts))], "text": texts,
                       "content_hash": [content_hash(t) for t in texts]})

    manager = GpuLeaseManager(work / "locks", timeout_s=60)
    report: dict = {"device": torch.cuda.get_device_name(0), "chunks": len(texts), "models": {}, "checks": {}}
    stored = {}
    plan = build_run_plan(registry, EmbedderSettings(enable_sparse=False))
    for spec in registry.dense:
        ctx = StageContext("smoke", plan, StorageLayout(work / "store"),
                           lease=lambda name=spec.name: manager.lease(owner=f"dense/{name}"))
        out = run_stage(ctx, DENSE, spec, chunks)  # load -> encode -> close inside the lease
        stored[spec.name] = read_embeddings(out.value.publish())
        record, summary = out.record, out.record.lease
        report["models"][spec.name] = {"lease": summary, "encode": record.encode.to_dict()}
        before = summary["vram_before"][0]
        after = summary["vram_after"][0]
        print(f"{spec.name}: {record.encode.tokens_per_second():,.0f} tok/s, "
              f"VRAM used before {before['used_mib']} MiB, after {after['used_mib']} MiB, "
              f"torch peak {summary['vram_peak_torch_mib']} MiB ({before['source']})")

    # Exclusive ensemble: after each release the card is back near where it started.
    snapshots = [m["lease"] for m in report["models"].values()]
    first_before = snapshots[0]["vram_before"][0]["used_mib"]
    last_after = snapshots[-1]["vram_after"][0]["used_mib"]
    report["checks"]["vram_measured"] = all(s["vram_before"][0]["used_mib"] is not None and
                                            s["vram_after"][0]["used_mib"] is not None for s in snapshots)
    report["checks"]["released_between_models"] = bool(last_after is not None and first_before is not None
                                                       and last_after - first_before < 512)

    t0 = time.perf_counter()
    fused_out = run_stage(StageContext("smoke", plan, StorageLayout(work / "store")), FUSION, chunks,
                          {s.asset_name: stored[s.name] for s in registry.dense})
    fused = read_embeddings(fused_out.value.publish())
    report["fusion"] = {"seconds": time.perf_counter() - t0, "dim": fused.dim}
    report["checks"]["fused_unit_norm"] = bool(np.allclose(np.linalg.norm(fused.vectors, axis=1), 1, atol=1e-4))

    # Forced OOM: a memory ceiling far below what the start budget needs; the stage must back off
    # (halving the budget, retrying the same rows) and produce the same vectors.
    spec = registry.dense[1]
    oom_manager = GpuLeaseManager(work / "locks", timeout_s=60, memory_fraction=args.oom_fraction)
    ctx = StageContext("smoke", plan, StorageLayout(work / "oom"), token_budget=131072,
                       lease=lambda: oom_manager.lease(owner="dense/oom"))
    oom = run_stage(ctx, DENSE, spec, chunks)
    again, record = read_embeddings(oom.value.publish()), oom.record
    mitigations = record.encode.oom_mitigations
    worst = float(np.min(np.sum(again.vectors * stored[spec.name].vectors, axis=1)))
    report["oom"] = {"memory_fraction": args.oom_fraction, "mitigations": mitigations,
                     "token_budget": [record.encode.token_budget_start, record.encode.token_budget_final],
                     "worst_row_cosine_vs_unconstrained": worst, "lease": record.lease}
    report["checks"]["oom_backoff_happened"] = len(mitigations) > 0
    report["checks"]["oom_same_vectors"] = worst > 0.999
    print(f"forced OOM: {len(mitigations)} backoffs, budget {report['oom']['token_budget']}, worst cosine {worst:.5f}")

    from benchmarks.bench_encode import peak_rss_mb

    report["peak_rss_mb"] = peak_rss_mb()
    print(f"peak RSS of the whole process: {report['peak_rss_mb']:.0f} MB for {len(texts)} chunks")
    print(json.dumps(report["checks"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=str))
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
