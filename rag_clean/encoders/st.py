"""sentence-transformers backends: models load through sentence-transformers (so the model
folder's pooling / normalize / activation config is honoured), but the encode loop is ours:
tokenize once ahead of the device, length-sorted token-budget batches, half precision on CUDA,
pooling / normalization / SPLADE / top-k on the device, asynchronous copies back, OOM backoff.
"""

from __future__ import annotations

import gc
import os
import queue
import sys
import threading
import time
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rag_clean.encoders.base import BatchRecord, DenseEncoder, EncodeStats, Reranker, SparseEncoder
from rag_clean.encoders.batching import (
    BatchSource,
    BudgetController,
    BudgetStore,
    EncoderError,
    TokenWindow,
    Tokenizer,
    iter_batches,
    tokenize_windows,
    DEFAULT_FIRST_WINDOW_ITEMS,
    DEFAULT_WINDOW_ITEMS,
)
from rag_clean.encoders.fast_bert import FastBert, pool_unpadded, segment_ids
from rag_clean.registry import ModelSpec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_devices(device) -> list[torch.device]:
    """'cpu' | 'cuda' | 'cuda:0,cuda:1' | ['cuda:0', 'cuda:1'] -> devices (one replica each)."""
    if isinstance(device, (list, tuple)):
        names = [str(d) for d in device]
    else:
        names = [d.strip() for d in str(device).split(",") if d.strip()]
    if not names:
        raise EncoderError(f"no device in {device!r}")
    devices = [torch.device(n) for n in names]
    for d in devices:
        if d.type == "cuda" and not torch.cuda.is_available():
            raise EncoderError(f"device {d} requested but CUDA is not available on this machine")
    return [torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d
            for d in devices]


def resolve_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    if spec.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[spec.dtype]


def _transformer_module(st_model):
    first = st_model[0]
    hf = getattr(first, "auto_model", None) or getattr(first, "model", None)
    if hf is None:
        raise EncoderError(f"{type(first).__name__} has no Hugging Face model (auto_model)")
    return first, hf


def _effective_max_length(spec: ModelSpec, module, hf) -> int:
    limits = [spec.max_length]
    msl = getattr(module, "max_seq_length", None)
    if msl:
        limits.append(int(msl))
    mpe = getattr(hf.config, "max_position_embeddings", None)
    if mpe:
        # RoBERTa-family position ids start after the pad index, leaving 2 fewer usable positions.
        offset = 2 if getattr(hf.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") else 0
        limits.append(int(mpe) - offset)
    return max(1, min(limits))


def _bytes_per_token(hf, dtype: torch.dtype, extra_width: int = 0) -> int:
    cfg = hf.config
    d = getattr(cfg, "hidden_size", 1024)
    f = getattr(cfg, "intermediate_size", 4 * d)
    elem = torch.finfo(dtype).bits // 8
    # Live activations of one layer at a time (hidden, qkv, attention out, MLP intermediate) with
    # headroom for allocator fragmentation; the weights are already resident.
    return int((10 * d + 2 * f + extra_width) * elem * 2)


class _Replica:
    def __init__(self, device: torch.device, st_model, hf):
        self.device = device
        self.st_model = st_model
        self.hf = hf
        self.fast: FastBert | None = None  # unpadded forward over hf's weights, when the architecture allows


class _StreamingModel:
    """Common encode loop. Subclasses implement `_launch(replica, window, rows) -> tuple[Tensor]`."""

    kind = "model"

    def __init__(self, spec: ModelSpec, devices: list[torch.device], load_fn, *, source: str,
                 budget_store: BudgetStore | None, token_budget: int | None, window_items: int = DEFAULT_WINDOW_ITEMS,
                 with_type_ids: bool = False, extra_width_per_token: int = 0, fast: bool = True,
                 attention: str = "auto", compile: bool = False):
        t0 = time.perf_counter()
        # fast=False keeps the Hugging Face module (padded batches, SDPA) for every batch;
        # the benchmark uses it to measure what the fast path buys.
        self.fast_options = {"enabled": fast, "attention": attention, "compile": compile}
        self.spec = spec
        self.source = source
        self.devices = devices
        self.dtype = resolve_dtype(spec, devices[0])
        self.replicas: list[_Replica] = []
        for device in devices:
            st_model = load_fn()
            st_model.eval()
            module, hf = _transformer_module(st_model)
            # Cast on the host, then move: the fp32 copy never occupies the device (peak VRAM at load
            # = the bf16 weights, which matters under a lease's memory ceiling).
            hf.to(dtype=self.dtype)
            st_model.to(device)
            self.replicas.append(_Replica(device, st_model, hf))
        module, hf = _transformer_module(self.replicas[0].st_model)
        self.module = module
        self.config = hf.config
        self.max_length = _effective_max_length(spec, module, hf)
        hf_tok = getattr(module, "tokenizer", None)
        if hf_tok is None:
            raise EncoderError(f"model {spec.name}: {source} has no tokenizer")
        self.tokenizer = Tokenizer(hf_tok, self.max_length, lowercase=bool(getattr(module, "do_lower_case", False)),
                                   with_type_ids=with_type_ids)
        self.window_items = window_items
        self.first_window_items = min(window_items, DEFAULT_FIRST_WINDOW_ITEMS)
        self.stats = EncodeStats(model=spec.name, backend="sentence-transformers",
                                 device=",".join(str(d) for d in devices), dtype=str(self.dtype).replace("torch.", ""))
        self.controllers = [
            BudgetController.create(
                spec.name, d, token_budget=token_budget, store=budget_store, floor=min(self.max_length, 64),
                bytes_per_token=_bytes_per_token(hf, self.dtype, extra_width_per_token),
                stats=self.stats if i == 0 else None)
            for i, d in enumerate(devices)
        ]
        self._batch_counter = 0
        self._counter_lock = threading.Lock()
        self.unpadded = False
        self.stats.load_seconds = time.perf_counter() - t0

    # -- helpers for subclasses ---------------------------------------------------------------

    def _enable_fast(self, encoder_of) -> None:
        """Build the unpadded forward on every replica from `encoder_of(hf)` (the BertModel part)."""
        if not self.fast_options["enabled"]:
            return
        for r in self.replicas:
            r.fast = FastBert.build(encoder_of(r.hf), r.hf.config, attention=self.fast_options["attention"],
                                    compile=self.fast_options["compile"])
        self.unpadded = all(r.fast is not None for r in self.replicas)
        if not self.unpadded:
            for r in self.replicas:
                r.fast = None

    def _fast_hidden(self, replica, window: TokenWindow, rows: np.ndarray):
        batch = self._to_device(window.unpadded(rows), replica.device)
        hidden = replica.fast(batch["input_ids"], batch["position_ids"], batch.get("token_type_ids"),
                              batch["cu_seqlens"], batch["max_seqlen"])
        return hidden, batch["cu_seqlens"]

    def _to_device(self, arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in arrays.items():
            if not isinstance(v, np.ndarray):
                out[k] = v
                continue
            t = torch.from_numpy(v)
            if device.type == "cuda":
                t = t.pin_memory().to(device, non_blocking=True)
            out[k] = t
        return out

    def _next_batch_index(self) -> int:
        with self._counter_lock:
            return self._batch_counter

    # -- the loop -----------------------------------------------------------------------------

    def _launch(self, replica: _Replica, window: TokenWindow, rows: np.ndarray) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _stream_on(self, replica: _Replica, controller: BudgetController, window: TokenWindow,
                   source: BatchSource) -> Iterator[tuple[np.ndarray, tuple[np.ndarray, ...]]]:
        """Run `source`'s batches on one replica, one batch in flight behind the one being launched."""
        device = replica.device
        cuda = device.type == "cuda"
        lengths = window.lengths
        pending = None  # (rows, host tensors, done event, start event, end event or t0, budget)

        def finish(p):
            rows, host, done, start, end, budget = p
            if cuda:
                done.synchronize()
                seconds = start.elapsed_time(end) / 1000.0
            else:
                seconds = end - start
            tokens = int(lengths[rows].sum())
            padded = tokens if self.unpadded else int(lengths[rows].max()) * len(rows)
            record = BatchRecord(items=len(rows), tokens=tokens, padded_tokens=padded,
                                 seconds=seconds, token_budget=budget)
            with self._counter_lock:
                self.stats.batches.append(record)
                self._batch_counter += 1
            return window.start + rows.astype(np.int64), tuple(h.numpy() for h in host)

        def launch(rows):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                outs = self._launch(replica, window, rows)
                end.record()
                host = tuple(torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in outs)
                for h, o in zip(host, outs):
                    h.copy_(o, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                return host, done, start, end
            t0 = time.perf_counter()
            outs = self._launch(replica, window, rows)
            return tuple(o.contiguous() for o in outs), None, t0, time.perf_counter()

        with torch.inference_mode(), (torch.cuda.device(device) if cuda else _nullcontext()):
            for rows, (host, done, start, end) in iter_batches(source, controller, launch, self._next_batch_index):
                if pending is not None:
                    yield finish(pending)
                pending = (rows, host, done, start, end, controller.budget)
            if pending is not None:
                yield finish(pending)

    def _stream(self, texts: Sequence[str], pairs: Sequence[str] | None = None):
        t0 = time.perf_counter()
        # The tokenize-ahead thread and this (kernel-launching) thread share the GIL; at the default
        # 5 ms switch interval each wake-up after a device sync can wait that long for it.
        # RAG_CLEAN_GIL_SWITCH_MS=0 keeps the interpreter's setting.
        switch_ms = float(os.environ.get("RAG_CLEAN_GIL_SWITCH_MS", "0.5"))
        saved_switch = sys.getswitchinterval()
        if switch_ms > 0 and any(d.type == "cuda" for d in self.devices):
            sys.setswitchinterval(min(saved_switch, switch_ms / 1000.0))
        try:
            for window in tokenize_windows(self.tokenizer, texts, pairs, self.window_items,
                                           self.first_window_items):
                self.stats.tokenize_seconds += window.seconds
                source = BatchSource(window.lengths)
                if len(self.replicas) == 1:
                    yield from self._stream_on(self.replicas[0], self.controllers[0], window, source)
                else:
                    yield from self._stream_multi(window, source)
            for c in self.controllers:
                c.remember()
        finally:
            sys.setswitchinterval(saved_switch)
            self.stats.wall_seconds += time.perf_counter() - t0

    def _stream_multi(self, window: TokenWindow, source: BatchSource):
        """One thread per replica pulls from the shared source; results come back through a queue."""
        results: queue.Queue = queue.Queue(maxsize=4 * len(self.replicas))
        stop = threading.Event()

        def work(replica, controller):
            try:
                for item in self._stream_on(replica, controller, window, source):
                    if stop.is_set():
                        return
                    results.put(("ok", item))
            except BaseException as exc:
                results.put(("error", exc))
            finally:
                results.put(("done", None))

        threads = [threading.Thread(target=work, args=(r, c), daemon=True, name=f"encode-{r.device}")
                   for r, c in zip(self.replicas, self.controllers)]
        for t in threads:
            t.start()
        running = len(threads)
        try:
            while running:
                kind, value = results.get()
                if kind == "done":
                    running -= 1
                elif kind == "error":
                    raise value
                else:
                    yield value
        finally:
            stop.set()
            while any(t.is_alive() for t in threads):
                try:
                    results.get(timeout=0.05)
                except queue.Empty:
                    pass

    def close(self) -> None:
        cuda = any(r.device.type == "cuda" for r in self.replicas)
        for r in self.replicas:
            r.st_model = None
            r.hf = None
            r.fast = None
        self.replicas = []
        self.module = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------
# Dense
# ---------------------------------------------------------------------------------------------

_SIMPLE_POOLING = ("mean", "cls", "max", "lasttoken")


def _pooling_mode(module) -> str | None:
    mode = getattr(module, "pooling_mode", None)
    if isinstance(mode, (list, tuple)):
        mode = mode[0] if len(mode) == 1 else None
    if mode is None and hasattr(module, "get_pooling_mode_str"):
        mode = module.get_pooling_mode_str()
    return mode


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool [b, L, d] hidden states over the real tokens of `mask` [b, L], in float32."""
    if mode == "cls":
        return hidden[:, 0].float()
    if mode == "lasttoken":
        last = mask.sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
    m = mask.unsqueeze(-1)
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(1).float()
    summed = (hidden.float() * m).sum(1)
    return summed / m.sum(1).clamp(min=1)


class STDenseEncoder(_StreamingModel, DenseEncoder):
    """Dense encoder for SentenceTransformer model folders."""

    kind = "dense"

    def __init__(self, spec: ModelSpec, device="cpu", *, source: str | None = None, budget_store=None,
                 token_budget: int | None = None, window_items: int = DEFAULT_WINDOW_ITEMS, **engine_options):
        from sentence_transformers import SentenceTransformer

        path = source or spec.resolve_source()
        devices = parse_devices(device)
        super().__init__(spec, devices, lambda: SentenceTransformer(path, device="cpu", local_files_only=True),
                         source=path, budget_store=budget_store, token_budget=token_budget, window_items=window_items,
                         **engine_options)
        st_model = self.replicas[0].st_model
        getter = getattr(st_model, "get_embedding_dimension", None) or st_model.get_sentence_embedding_dimension
        self.dim = int(getter())
        if spec.dim is not None and spec.dim != self.dim:
            dim = self.dim
            self.close()
            raise EncoderError(
                f"model {spec.name}: registry dim {spec.dim} but {path} produces {dim}-d vectors; fix `dim` in the registry"
            )
        # We pool ourselves for Transformer -> Pooling -> [Normalize]; anything else runs through the
        # model's own modules (still on the device, padded).
        names = [type(m).__name__ for m in st_model]
        self.pooling_mode = _pooling_mode(st_model[1]) if len(names) > 1 and names[1] == "Pooling" else None
        simple = (
            self.pooling_mode in _SIMPLE_POOLING
            and getattr(st_model[1], "include_prompt", True)
            and all(n == "Normalize" for n in names[2:])
        )
        self.extra_modules = None if simple else [list(r.st_model)[1:] for r in self.replicas]
        if simple:
            self._enable_fast(lambda hf: hf)

    def _launch(self, replica, window, rows):
        if replica.fast is not None:
            hidden, cu = self._fast_hidden(replica, window, rows)
            return (F.normalize(pool_unpadded(hidden, cu, self.pooling_mode), p=2, dim=-1),)
        batch = self._to_device(window.padded(rows, self.tokenizer.pad_id), replica.device)
        out = replica.hf(**batch, return_dict=True)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if self.extra_modules is None:
            emb = pool(hidden, batch["attention_mask"], self.pooling_mode)
        else:
            features = {"token_embeddings": hidden, **batch}
            for m in self.extra_modules[self.replicas.index(replica)]:
                features = m(features)
            emb = features["sentence_embedding"].float()
        return (F.normalize(emb, p=2, dim=-1),)

    def encode(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for idx, (vecs,) in self._stream(texts):
            yield idx, vecs


# ---------------------------------------------------------------------------------------------
# Sparse (SPLADE)
# ---------------------------------------------------------------------------------------------

# Bytes of vocab-wide activations computed at once: no [tokens, vocab] tensor is ever larger.
SPLADE_CHUNK_BYTES = 256 * 1024 * 1024


class STSparseEncoder(_StreamingModel, SparseEncoder):
    """SPLADE: log(1 + relu(MLM logits)) max-pooled over real tokens, top-k on the device."""

    kind = "sparse"

    def __init__(self, spec: ModelSpec, device="cpu", *, source: str | None = None, budget_store=None,
                 token_budget: int | None = None, window_items: int = DEFAULT_WINDOW_ITEMS, **engine_options):
        from sentence_transformers import SparseEncoder as STSparse

        path = source or spec.resolve_source()
        devices = parse_devices(device)
        super().__init__(spec, devices, lambda: STSparse(path, device="cpu", local_files_only=True),
                         source=path, budget_store=budget_store, token_budget=token_budget, window_items=window_items,
                         **engine_options)
        st_model = self.replicas[0].st_model
        hf = self.replicas[0].hf
        self.vocab_size = int(hf.config.vocab_size)
        pooling = st_model[1] if len(st_model) > 1 else None
        if pooling is None or type(pooling).__name__ != "SpladePooling":
            self.close()
            raise EncoderError(f"model {spec.name}: {path} is not a SPLADE model (no SpladePooling module)")
        if pooling.pooling_strategy != "max" or pooling.activation_function not in ("relu", "log1p_relu"):
            self.close()
            raise EncoderError(
                f"model {spec.name}: SPLADE pooling {pooling.pooling_strategy!r}/{pooling.activation_function!r} "
                "is not supported (max with relu or log1p_relu)"
            )
        if not type(hf).__name__.endswith("ForMaskedLM"):
            name = type(hf).__name__
            self.close()
            raise EncoderError(f"model {spec.name}: {path} loads as {name}, not a masked-LM model; SPLADE needs the MLM head")
        self.double_log = pooling.activation_function == "log1p_relu"
        # BERT-family MLM: run the encoder, then the MLM head over real tokens only, in chunks.
        self.split_head = hasattr(hf, "cls") and hasattr(hf, "base_model")
        self.top_k = min(int(spec.top_k), self.vocab_size)
        # Unpadded batches pool with a segment max over contiguous rows; RAG_CLEAN_SPLADE_SEGMENT_MAX=0
        # switches to the scatter-max (index_reduce_) that padded batches use, for comparison.
        self.segment_max = os.environ.get("RAG_CLEAN_SPLADE_SEGMENT_MAX", "1") != "0"
        if self.split_head:
            self._enable_fast(lambda m: m.base_model)

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
        elem = flat.element_size()
        step = max(1, SPLADE_CHUNK_BYTES // (self.vocab_size * elem))
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
        elem = flat.element_size()
        step = max(1, SPLADE_CHUNK_BYTES // (self.vocab_size * elem))
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

    def _launch(self, replica, window, rows):
        hf = replica.hf
        b = len(rows)
        if replica.fast is not None:
            hidden, cu = self._fast_hidden(replica, window, rows)
            if self.segment_max:
                pooled = self._pool_rows(hf, hidden, cu, window.lengths[rows])
            else:
                pooled = self._pool_tokens(hf, hidden, segment_ids(cu, hidden.shape[0]), b)
        elif self.split_head:
            batch = self._to_device(window.padded(rows, self.tokenizer.pad_id), replica.device)
            mask = batch["attention_mask"].bool()
            hidden = hf.base_model(**batch, return_dict=True).last_hidden_state
            row_of = torch.arange(b, device=replica.device).repeat_interleave(mask.sum(1))
            pooled = self._pool_tokens(hf, hidden[mask], row_of, b)  # real tokens only
        else:
            batch = self._to_device(window.padded(rows, self.tokenizer.pad_id), replica.device)
            width = batch["input_ids"].shape[1]
            pooled = torch.zeros(b, self.vocab_size, dtype=torch.float32, device=replica.device)
            step = max(1, SPLADE_CHUNK_BYTES // (width * self.vocab_size * 4))
            for s in range(0, b, step):
                part = {k: v[s:s + step] for k, v in batch.items()}
                logits = hf(**part, return_dict=True).logits.float()
                act = self._activate(logits) * part["attention_mask"].unsqueeze(-1)
                pooled[s:s + step] = act.amax(1)
        weights, terms = torch.topk(pooled, self.top_k, dim=1, sorted=True)
        return terms.to(torch.int32), weights.float()

    def encode(self, texts: Sequence[str]):
        for idx, (terms, weights) in self._stream(texts):
            rows = []
            for t, w in zip(terms, weights):
                keep = w > 0
                rows.append((np.ascontiguousarray(t[keep]), np.ascontiguousarray(w[keep])))
            yield idx, rows

    def decode_terms(self, term_ids: Sequence[int]) -> list[str]:
        return self.tokenizer.hf.convert_ids_to_tokens([int(t) for t in term_ids])


# ---------------------------------------------------------------------------------------------
# Rerank (cross-encoder)
# ---------------------------------------------------------------------------------------------


def _classifier_on_cls(hf):
    """fn(cls_hidden [b, d]) -> logits for BERT / RoBERTa sequence classifiers, else None."""
    model_type = getattr(hf.config, "model_type", "")
    if model_type in ("roberta", "xlm-roberta") and hasattr(hf, "classifier"):
        return lambda cls: hf.classifier(cls.unsqueeze(1))  # the head reads features[:, 0]
    bert = getattr(hf, "bert", None)
    if model_type == "bert" and bert is not None and bert.pooler is not None and isinstance(hf.classifier, torch.nn.Linear):
        return lambda cls: hf.classifier(bert.pooler(cls.unsqueeze(1)))
    return None


class STCrossEncoderReranker(_StreamingModel, Reranker):
    """Cross-encoder scores (the model's activation applied, as CrossEncoder.predict does)."""

    kind = "rerank"

    def __init__(self, spec: ModelSpec, device="cpu", *, source: str | None = None, budget_store=None,
                 token_budget: int | None = None, window_items: int = DEFAULT_WINDOW_ITEMS,
                 source_label: str | None = None, **engine_options):
        from sentence_transformers import CrossEncoder

        path = source or spec.resolve_source()
        devices = parse_devices(device)
        holder = {}

        def load():
            model = CrossEncoder(path, device="cpu", local_files_only=True)
            holder.setdefault("activation", model.activation_fn)
            holder.setdefault("num_labels", model.num_labels)
            return model

        super().__init__(spec, devices, load, source=path, budget_store=budget_store, token_budget=token_budget,
                         window_items=window_items, with_type_ids=False, **engine_options)
        tok_names = getattr(self.tokenizer.hf, "model_input_names", []) or []
        self.tokenizer.with_type_ids = "token_type_ids" in tok_names and getattr(self.config, "type_vocab_size", 1) > 1
        if holder["num_labels"] != 1:
            n = holder["num_labels"]
            self.close()
            raise EncoderError(f"model {spec.name}: {path} has {n} labels; a reranker needs a single relevance logit")
        self.activation = holder["activation"]
        # Name the source as the registry spelled it (hub id, package:...), not the local cache path.
        self.scorer_id = f"cross-encoder:{source_label or spec.source}"
        self.heads = [_classifier_on_cls(r.hf) for r in self.replicas]
        if all(h is not None for h in self.heads):
            self._enable_fast(lambda m: m.base_model)

    def _launch(self, replica, window, rows):
        if replica.fast is not None:
            hidden, cu = self._fast_hidden(replica, window, rows)
            logits = self.heads[self.replicas.index(replica)](hidden[cu[:-1].long()]).float()
        else:
            batch = self._to_device(window.padded(rows, self.tokenizer.pad_id), replica.device)
            logits = replica.hf(**batch, return_dict=True).logits.float()
        scores = self.activation(logits) if self.activation is not None else logits
        return (scores.reshape(-1),)

    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        pairs = list(pairs)
        for i, p in enumerate(pairs):
            if not (isinstance(p, (tuple, list)) and len(p) == 2):
                raise EncoderError(f"rerank input row {i}: expected a (query, passage) pair, got {type(p).__name__}")
        out = np.full(len(pairs), np.nan, dtype=np.float32)
        if not pairs:
            return out
        queries = [p[0] for p in pairs]
        passages = [p[1] for p in pairs]
        for idx, (scores,) in self._stream(queries, passages):
            out[idx] = scores
        return out
