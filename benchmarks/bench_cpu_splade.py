"""SPLADE-tiny on the CPU (issue 23 item 3): sentence-transformers SparseEncoder fp32 batch 32 against
rag_clean's sparse encoder with the token-chunked MLM head and with the vocabulary-sliced head
(RAG_CLEAN_SPLADE_VOCAB_SLICE), on the sample collection's chunks, interleaved in one process; prints JSON with
CPU and wall seconds per repetition and top-10 agreement with ST.

  TT=1 REPS=3 SLICES=1024,4096 python benchmarks/bench_cpu_splade.py > out.json
"""
import os, sys, time, json, warnings; warnings.filterwarnings("ignore")
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(int(os.environ.get("TT", "1")))
from rag_clean.chunking.collection import read_collection
from rag_clean.config.registry import load_registry
from rag_clean.encoders.factory import load_sparse_encoder
from sentence_transformers import SparseEncoder
texts = read_collection(Path('data/collections/sample')).table.column('text').to_pylist()
spec = load_registry().get("splade-tiny")
st = SparseEncoder(spec.resolve_source(), device="cpu"); st.max_seq_length = spec.max_length
encs = {}
for name, sl in [("ours", None)] + [(f"ours_vocab_slice_{w}", w) for w in os.environ.get("SLICES", "4096").split(",")]:
    if sl: os.environ["RAG_CLEAN_SPLADE_VOCAB_SLICE"] = sl
    else: os.environ.pop("RAG_CLEAN_SPLADE_VOCAB_SLICE", None)
    encs[name] = load_sparse_encoder(spec)
os.environ.pop("RAG_CLEAN_SPLADE_VOCAB_SLICE", None)
def run_st(): return st.encode(texts, batch_size=32, convert_to_tensor=True).to_dense().numpy()
def run_enc(e):
    out = [None]*len(texts)
    for b in e.encode(texts):
        for i, r in zip(b.rows, b.lexical): out[i] = r
    return out
ref = run_st()
def top10_same(rows):
    return float(np.mean([set(np.argsort(-ref[i])[:10].tolist()) == set(t[:10].tolist()) for i, (t, w) in enumerate(rows)]))
res = {"threads": torch.get_num_threads(), "texts": len(texts), "cpu_seconds": {}, "wall_seconds": {}}
fns = {"st_fp32_b32": run_st, **{k: (lambda e=e: run_enc(e)) for k, e in encs.items()}}
for k in encs: res[f"{k}_top10_same_as_st"] = top10_same(run_enc(encs[k]))
for rep in range(int(os.environ.get("REPS", "3"))):
    for k, fn in fns.items():
        t = time.process_time(); w = time.perf_counter(); fn()
        res["cpu_seconds"].setdefault(k, []).append(round(time.process_time() - t, 3)); res["wall_seconds"].setdefault(k, []).append(round(time.perf_counter() - w, 3))
med = {k: float(np.median(v)) for k, v in res["cpu_seconds"].items()}
res["cpu_ratio_vs_st"] = {k: med["st_fp32_b32"] / v for k, v in med.items()}
print(json.dumps(res, indent=1))
