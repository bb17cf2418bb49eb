"""CPU levers for the dense encode (issue 23 item 3), in one process, interleaved: sentence-transformers fp32
batch 32 (the baseline), rag_clean's encoder (FastBert, unpadded), ONNX Runtime fp32 (the HF model exported here
with torch.onnx, length-sorted padded batches, 1 or 2 intra-op threads) and ONNX Runtime int8 dynamic
quantization. Real model (registry name, default all-minilm-l6-v2) on the sample collection's chunks.
Prints worst-row cosine vs ST fp32 and, per repetition, wall and process CPU seconds (CPU seconds are what
a shared box's other jobs disturb least; TT=1 runs torch on one thread so they compare work, not spinning).

  TT=1 REP=1 REPS=3 python benchmarks/bench_cpu_dense_levers.py all-minilm-l6-v2
Needs onnxruntime and onnx (not project dependencies: no lever here was kept).
"""
import os, sys, tempfile, time, statistics, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
import numpy as np, torch
from rag_clean.chunking.collection import read_collection
from rag_clean.config.registry import load_registry
from rag_clean.encoders.st_dense import STDenseEncoder
from sentence_transformers import SentenceTransformer

texts = read_collection(Path('data/collections/sample')).table.column('text').to_pylist()
texts = texts * int(os.environ.get("REP", "2"))
reg = load_registry(); spec = reg.get(sys.argv[1] if len(sys.argv) > 1 else "all-minilm-l6-v2")
path = spec.resolve_source()
torch.set_num_threads(int(os.environ.get("TT", "2")))
print("threads", torch.get_num_threads(), "texts", len(texts))
st = SentenceTransformer(path, device="cpu")
st.max_seq_length = spec.max_length
ours = STDenseEncoder(spec, "cpu")
def run_ours(tx):
    out = np.zeros((len(tx), 384), np.float32)
    for e in ours.encode(tx): out[e.rows] = e.dense
    return out
def run_st(tx): return st.encode(tx, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)

# ORT
import onnxruntime as ort
hf = st[0].auto_model
onnx_path = os.path.join(tempfile.gettempdir(), "rag_clean_bench_%s.onnx" % spec.name)
if not os.path.exists(onnx_path):
    ids = torch.ones(2, 16, dtype=torch.long)
    class W(torch.nn.Module):
        def __init__(s, m): super().__init__(); s.m = m
        def forward(s, input_ids, attention_mask): return s.m(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
    hf.config._attn_implementation = "eager"
    torch.onnx.export(W(hf).eval(), (ids, torch.ones_like(ids)), onnx_path, input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"], dynamic_axes={"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}, "last_hidden_state": {0:"b",1:"t"}}, opset_version=17, dynamo=False)
tok = st.tokenizer
def make_sess(n):
    so = ort.SessionOptions(); so.intra_op_num_threads = n; so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
sess = {n: make_sess(n) for n in (1, 2)}
from onnxruntime.quantization import quantize_dynamic, QuantType
qpath = onnx_path.replace(".onnx", ".int8.onnx")
if not os.path.exists(qpath):
    quantize_dynamic(onnx_path, qpath, weight_type=QuantType.QInt8)
so = ort.SessionOptions(); so.intra_op_num_threads = 1
sess["q8"] = ort.InferenceSession(qpath, so, providers=["CPUExecutionProvider"])
def run_ort(tx, n=1, budget=8192):
    enc = tok(tx, truncation=True, max_length=spec.max_length)
    ids = enc["input_ids"]; order = np.argsort([-len(x) for x in ids])
    out = np.zeros((len(tx), 384), np.float32); i = 0
    while i < len(order):
        L = len(ids[order[i]]); b = max(1, budget // L); rows = order[i:i+b]; i += b
        a = np.zeros((len(rows), L), np.int64); m = np.zeros_like(a)
        for j, r in enumerate(rows):
            a[j, :len(ids[r])] = ids[r]; m[j, :len(ids[r])] = 1
        h = sess[n].run(None, {"input_ids": a, "attention_mask": m})[0]
        e = (h * m[..., None]).sum(1) / m.sum(1, keepdims=True)
        out[rows] = e / np.linalg.norm(e, axis=1, keepdims=True)
    return out

ref = run_st(texts)
def cos(x): return float((x * ref).sum(1).min())
variants = {
  "st_fp32_b32": run_st,
  "ours": run_ours,
  "ort_1t": lambda tx: run_ort(tx, 1),
  "ort_q8": lambda tx: run_ort(tx, "q8"),
}
for name, fn in variants.items():
    print(name, "worst cos", cos(fn(texts)))
times = {k: [] for k in variants}
for rep in range(int(os.environ.get("REPS", "3"))):
    for name, fn in variants.items():
        t = time.process_time(); w=time.perf_counter(); fn(texts); times[name].append(time.process_time() - t); print(name, 'wall', round(time.perf_counter()-w,2), 'cpu', round(times[name][-1],2), flush=True)
base = statistics.median(times["st_fp32_b32"])
for k, v in times.items():
    print(f"{k:14s} median {statistics.median(v):.2f}s  speedup vs ST {base/statistics.median(v):.2f}x  all {['%.2f'%x for x in v]}")
