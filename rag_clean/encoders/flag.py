"""FlagEmbedding backends: registry entries with `backend = "flagembedding"`.

- FlagDenseEncoder: FlagModel (CLS or mean pooling), or BGEM3FlagModel's dense head when
  `flag_class = "bge-m3"`.
- FlagSparseEncoder: BGEM3FlagModel lexical weights.
- BGEM3JointEncoder: dense + lexical (+ optional ColBERT) from ONE forward pass per batch.
- FlagRerankerAdapter: FlagReranker.compute_score with batch halving on CUDA OOM.

FlagEmbedding loads the weights and supplies pooling and the M3 heads; tokenization, length-sorted
token-budget batching and OOM backoff come from `rag_clean.encoders.batching`. FlagEmbedding's own
encode() is not used for the encoders because it tokenizes and holds the whole input, returns only at
the end, and runs an extra probe forward on its first batch (swallowing any RuntimeError as "too big").
FlagEmbedding is imported lazily, so this module imports on machines that lack it.
"""

from __future__ import annotations

import gc
import time
import warnings
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from rag_clean.encoders.base import BatchRecord, DenseEncoder, EncodeStats, Reranker, SparseEncoder
from rag_clean.encoders.batching import (
    DEFAULT_WINDOW_ITEMS,
    BatchSource,
    BudgetController,
    BudgetStore,
    EncoderError,
    Tokenizer,
    is_oom,
    iter_batches,
    tokenize_windows,
)
from rag_clean.registry import ModelSpec

BACKEND = "flagembedding"
FLAG_POOLINGS = ("cls", "mean")
RERANK_MAX_OOM_RETRIES = 3

SparseRow = tuple[np.ndarray, np.ndarray]


# ---------------------------------------------------------------------------------------------
# Loading: device, dtype, fallbacks, shape checks
# ---------------------------------------------------------------------------------------------


def _check_device(spec: ModelSpec, device: str | Sequence[str]) -> torch.device:
    """One torch.device. FlagEmbedding models here run on one device: of several (a list or
    "cuda:0,cuda:1"), the first is used, with a warning, rather than failing a multi-GPU step."""
    devices = [d.strip() for d in (device.split(",") if isinstance(device, str) else device) if d.strip()]
    if not devices:
        raise EncoderError(f"model {spec.name}: no device given")
    if len(devices) > 1:
        warnings.warn(f"model {spec.name}: flagembedding backend uses one device; running on {devices[0]} of {devices}",
                      stacklevel=3)
    dev = torch.device(devices[0])
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(f"model {spec.name}: device {device!r} requested but CUDA is not available")
    return dev


def _half_dtype(spec: ModelSpec, device: torch.device) -> str:
    """Compute dtype: fp16 (or bf16 when asked) on CUDA only; float32 on CPU whatever the registry says."""
    if device.type != "cuda" or spec.dtype == "float32":
        return "float32"
    return "bfloat16" if spec.dtype == "bfloat16" else "float16"


def _load_first(spec: ModelSpec, load: Callable[[str], object]) -> tuple[object, str, dict | None]:
    """Load the primary source, else each fallback in order; error lists why every one failed."""
    failures = []
    for i, source in enumerate(spec.candidate_sources()):
        try:
            obj = load(spec.resolve_source(source))
        except Exception as exc:  # any loader failure moves on to the next fallback
            failures.append(f"{source}: {type(exc).__name__}: {exc}")
            continue
        fallback = None
        if i > 0:
            fallback = {"applied": True, "reason": "; ".join(failures), "source": source}
        return obj, source, fallback
    raise EncoderError(f"model {spec.name}: no source could be loaded ({' | '.join(failures)})")


def _check_max_length(spec: ModelSpec, config, source: str) -> None:
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return
    # RoBERTa-family position ids start after the padding index.
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta"):
        positions -= (config.pad_token_id or 0) + 1
    if spec.max_length > positions:
        raise EncoderError(
            f"model {spec.name} ({source}): max_length {spec.max_length} exceeds the model's {positions} positions"
        )


def _check_dim(spec: ModelSpec, produced: int, source: str) -> int:
    if spec.dim is not None and spec.dim != produced:
        raise EncoderError(
            f"model {spec.name} ({source}): produces {produced}-d vectors but the registry says dim = {spec.dim}"
        )
    return produced


def _bytes_per_token(config, dtype: str) -> int:
    # Rough activation footprint per token of one layer's forward, with headroom; only sizes the
    # first CUDA token budget (OOM backoff corrects it).
    hidden = int(getattr(config, "hidden_size", 768))
    inter = int(getattr(config, "intermediate_size", 4 * hidden))
    elem = 4 if dtype == "float32" else 2
    return (8 * hidden + 2 * inter) * elem * 4


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# The shared batch loop
# ---------------------------------------------------------------------------------------------


class _Runner:
    """Tokenize ahead in windows, run length-sorted token-budget batches, record one BatchRecord each."""

    def __init__(self, spec: ModelSpec, device: torch.device, hf_tokenizer, model: torch.nn.Module, stats: EncodeStats,
                 *, token_budget: int | None, budget_store: BudgetStore | None, window_items: int, dtype: str):
        self.spec = spec
        self.device = device
        self.stats = stats
        self.model = model
        self.tokenizer = Tokenizer(hf_tokenizer, spec.max_length)
        self.window_items = window_items
        self.budget = BudgetController.create(
            spec.name, device, token_budget=token_budget, store=budget_store,
            floor=min(spec.max_length, token_budget or spec.max_length),
            bytes_per_token=_bytes_per_token(model.config, dtype), stats=stats,
        )

    def _to_device(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in arrays.items():
            tensor = torch.from_numpy(value)
            if self.device.type == "cuda":
                tensor = tensor.pin_memory().to(self.device, non_blocking=True)
            out[key] = tensor
        return out

    def run(self, texts: Sequence[str], forward: Callable[[dict[str, torch.Tensor]], object]) -> Iterator[tuple[np.ndarray, object]]:
        """Yield (row_indices int64, forward(inputs) result) per batch; `forward` returns host data."""
        self.model.eval()
        busy = 0.0  # time inside this generator, not the caller's time between batches
        started = time.perf_counter()
        for window in tokenize_windows(self.tokenizer, texts, window=self.window_items):
            self.stats.tokenize_seconds += window.seconds
            source = BatchSource(window.lengths)

            def launch(rows: np.ndarray, window=window):
                t0 = time.perf_counter()
                inputs = self._to_device(window.padded(rows, self.tokenizer.pad_id))
                with torch.inference_mode():
                    result = forward(inputs)  # returns numpy: the copy back synchronises the device
                lengths = window.lengths[rows]
                record = BatchRecord(
                    items=len(rows), tokens=int(lengths.sum()), padded_tokens=int(lengths.max()) * len(rows),
                    seconds=time.perf_counter() - t0, token_budget=self.budget.budget,
                )
                return result, record

            for rows, (result, record) in iter_batches(source, self.budget, launch, lambda: len(self.stats.batches)):
                self.stats.batches.append(record)
                busy += time.perf_counter() - started
                yield (window.start + rows).astype(np.int64), result
                started = time.perf_counter()
        busy += time.perf_counter() - started
        self.stats.wall_seconds += busy
        self.budget.remember()


# ---------------------------------------------------------------------------------------------
# BGE-M3: one forward, any subset of dense / lexical / ColBERT
# ---------------------------------------------------------------------------------------------


class _M3:
    """A loaded BGEM3FlagModel plus our batch loop."""

    def __init__(self, spec: ModelSpec, device: str | Sequence[str], stats: EncodeStats, *, token_budget: int | None,
                 budget_store: BudgetStore | None, window_items: int):
        if spec.flag_class not in (None, "bge-m3"):
            raise EncoderError(f"model {spec.name}: flag_class {spec.flag_class!r} has no lexical/joint output; use 'bge-m3'")
        self.spec = spec
        self.device = _check_device(spec, device)
        dtype = _half_dtype(spec, self.device)
        stats.device, stats.dtype = str(self.device), dtype

        from FlagEmbedding import BGEM3FlagModel  # outside the load timer: the import is a one-off ~4 s

        def load(path: str):
            # BGE-M3 is trained with CLS pooling; spec.pooling (default "mean") describes
            # sentence-transformers models, so it is not applied here.
            return BGEM3FlagModel(
                path, pooling_method="cls", normalize_embeddings=True, use_fp16=dtype == "float16",
                use_bf16=dtype == "bfloat16", devices=str(self.device),
                query_max_length=spec.max_length, passage_max_length=spec.max_length,
            )

        t0 = time.perf_counter()
        flag, self.source, stats.fallback = _load_first(spec, load)
        self.flag = flag
        self.heads = flag.model  # EncoderOnlyEmbedderM3ModelForInference: transformer + sparse/colbert heads
        self.heads.to(self.device)
        if self.device.type == "cpu":
            self.heads.float()
        self.heads.eval()
        stats.load_seconds = time.perf_counter() - t0
        config = self.heads.model.config
        _check_max_length(spec, config, self.source)
        self.hidden = int(config.hidden_size)
        self.hf_tokenizer = flag.tokenizer
        self.vocab_size = max(int(config.vocab_size), len(flag.tokenizer))
        # Same exclusions as FlagEmbedding's lexical weights: CLS/EOS/PAD/UNK carry no term.
        self.unused_ids = np.array(sorted({
            tid for tid in (flag.tokenizer.cls_token_id, flag.tokenizer.eos_token_id,
                            flag.tokenizer.pad_token_id, flag.tokenizer.unk_token_id) if tid is not None
        }), dtype=np.int64)
        self.runner = _Runner(spec, self.device, flag.tokenizer, self.heads.model, stats, token_budget=token_budget,
                              budget_store=budget_store, window_items=window_items, dtype=dtype)

    @property
    def transformer(self) -> torch.nn.Module:
        return self.heads.model

    def batches(self, texts: Sequence[str], *, dense: bool, sparse: bool, colbert: bool, top_k: int):
        """Yield (rows, dense [b, h] | None, sparse rows | None, colbert list | None)."""

        def forward(inputs):
            out = self.heads(inputs, return_dense=dense, return_sparse=sparse, return_colbert_vecs=colbert)
            result = {}
            if dense:
                result["dense"] = out["dense_vecs"].float().cpu().numpy()
            if sparse:
                result["weights"] = out["sparse_vecs"].squeeze(-1).float().cpu().numpy()
            if colbert:
                result["colbert"] = out["colbert_vecs"].float().cpu().numpy()
            if sparse or colbert:
                result["input_ids"] = inputs["input_ids"].cpu().numpy()
                result["lengths"] = inputs["attention_mask"].sum(dim=1).cpu().numpy()
            return result

        for rows, result in self.runner.run(texts, forward):
            sparse_rows = colbert_rows = None
            if sparse:
                sparse_rows = [
                    lexical_top_k(result["input_ids"][i, :n], result["weights"][i, :n], self.unused_ids, top_k)
                    for i, n in enumerate(result["lengths"])
                ]
            if colbert:
                # ColBERT vectors skip CLS; keep only real tokens (FlagEmbedding drops the rest the same way).
                colbert_rows = [result["colbert"][i, : n - 1].copy() for i, n in enumerate(result["lengths"])]
            yield rows, result.get("dense"), sparse_rows, colbert_rows

    def close(self) -> None:
        self.heads.to("cpu")
        del self.flag, self.heads, self.runner
        _release(self.device)


def lexical_top_k(input_ids: np.ndarray, weights: np.ndarray, unused_ids: np.ndarray, top_k: int) -> SparseRow:
    """Per-term max weight over a text's tokens -> (term_ids int32, weights float32), desc, <= top_k.

    Ties break by term id so output is deterministic.
    """
    keep = (weights > 0) & ~np.isin(input_ids, unused_ids)
    ids, w = input_ids[keep], weights[keep]
    if ids.size == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    order = np.lexsort((-w, ids))  # by id, heaviest first within an id
    ids, w = ids[order], w[order]
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    ids, w = ids[first], w[first]
    top = np.lexsort((ids, -w))[:top_k]
    return ids[top].astype(np.int32), w[top].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Public encoders
# ---------------------------------------------------------------------------------------------


class FlagDenseEncoder(DenseEncoder):
    """Dense vectors from FlagModel (spec.pooling "cls" / "mean") or, with flag_class "bge-m3", BGEM3FlagModel."""

    def __init__(self, spec: ModelSpec, device: str | Sequence[str] = "cpu", *, token_budget: int | None = None,
                 budget_store: BudgetStore | None = None, window_items: int = DEFAULT_WINDOW_ITEMS):
        self.spec = spec
        self.stats = EncodeStats(model=spec.name, backend=BACKEND, device=str(device), dtype="float32")
        if spec.flag_class == "bge-m3":
            self._m3 = _M3(spec, device, self.stats, token_budget=token_budget, budget_store=budget_store,
                           window_items=window_items)
            self.source = self._m3.source
            self.dim = _check_dim(spec, self._m3.hidden, self.source)
            return
        if spec.flag_class is not None:
            raise EncoderError(f"model {spec.name}: unknown flag_class {spec.flag_class!r} (known: 'bge-m3' or none)")
        if spec.pooling not in FLAG_POOLINGS:
            raise EncoderError(f"model {spec.name}: pooling {spec.pooling!r} is not supported by FlagModel {FLAG_POOLINGS}")
        self._m3 = None
        self.device = _check_device(spec, device)
        dtype = _half_dtype(spec, self.device)
        self.stats.device, self.stats.dtype = str(self.device), dtype

        from FlagEmbedding import FlagModel  # outside the load timer: the import is a one-off ~4 s

        def load(path: str):
            # FlagModel defaults to CLS pooling and 512 tokens: always pass both from the registry.
            return FlagModel(
                path, pooling_method=spec.pooling, normalize_embeddings=True, use_fp16=dtype == "float16",
                use_bf16=dtype == "bfloat16", devices=str(self.device),
                query_max_length=spec.max_length, passage_max_length=spec.max_length,
            )

        t0 = time.perf_counter()
        self._flag, self.source, self.stats.fallback = _load_first(spec, load)
        self._model = self._flag.model.to(self.device)
        if self.device.type == "cpu":
            self._model.float()
        self.stats.load_seconds = time.perf_counter() - t0
        _check_max_length(spec, self._model.config, self.source)
        self.dim = _check_dim(spec, int(self._model.config.hidden_size), self.source)
        self._runner = _Runner(spec, self.device, self._flag.tokenizer, self._model, self.stats,
                               token_budget=token_budget, budget_store=budget_store, window_items=window_items,
                               dtype=dtype)

    @property
    def transformer(self) -> torch.nn.Module:
        return self._m3.transformer if self._m3 else self._model

    def encode(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self._m3 is not None:
            for rows, dense, _, _ in self._m3.batches(texts, dense=True, sparse=False, colbert=False, top_k=0):
                yield rows, dense
            return

        def forward(inputs):
            hidden = self._model(**inputs, return_dict=True).last_hidden_state
            pooled = self._flag.pooling(hidden, inputs["attention_mask"])
            return torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()

        yield from self._runner.run(texts, forward)

    def close(self) -> None:
        if self._m3 is not None:
            self._m3.close()
            return
        self._model.to("cpu")
        del self._flag, self._model, self._runner
        _release(self.device)


class FlagSparseEncoder(SparseEncoder):
    """BGE-M3 lexical weights: (term_ids int32, weights float32) per text, heaviest first, <= spec.top_k."""

    def __init__(self, spec: ModelSpec, device: str | Sequence[str] = "cpu", *, token_budget: int | None = None,
                 budget_store: BudgetStore | None = None, window_items: int = DEFAULT_WINDOW_ITEMS):
        self.spec = spec
        self.stats = EncodeStats(model=spec.name, backend=BACKEND, device=str(device), dtype="float32")
        self._m3 = _M3(spec, device, self.stats, token_budget=token_budget, budget_store=budget_store,
                       window_items=window_items)
        self.source = self._m3.source
        self.vocab_size = self._m3.vocab_size

    @property
    def transformer(self) -> torch.nn.Module:
        return self._m3.transformer

    def encode(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, list[SparseRow]]]:
        for rows, _, sparse_rows, _ in self._m3.batches(texts, dense=False, sparse=True, colbert=False,
                                                         top_k=self.spec.top_k):
            yield rows, sparse_rows

    def decode_terms(self, term_ids: Sequence[int]) -> list[str]:
        return self._m3.hf_tokenizer.convert_ids_to_tokens([int(t) for t in term_ids])

    def close(self) -> None:
        self._m3.close()


class BGEM3JointEncoder:
    """Dense + lexical (+ ColBERT when asked) from one forward pass per batch of a BGE-M3 model.

    Use instead of a FlagDenseEncoder and a FlagSparseEncoder on the same model: half the compute.
    `stats` covers the joint pass; `dim` is the dense width, `vocab_size` the lexical id space.
    """

    def __init__(self, spec: ModelSpec, device: str | Sequence[str] = "cpu", *, return_colbert: bool = False,
                 token_budget: int | None = None, budget_store: BudgetStore | None = None,
                 window_items: int = DEFAULT_WINDOW_ITEMS):
        self.spec = spec
        self.return_colbert = return_colbert
        self.stats = EncodeStats(model=spec.name, backend=BACKEND, device=str(device), dtype="float32")
        self._m3 = _M3(spec, device, self.stats, token_budget=token_budget, budget_store=budget_store,
                       window_items=window_items)
        self.source = self._m3.source
        self.dim = _check_dim(spec, self._m3.hidden, self.source)
        self.vocab_size = self._m3.vocab_size

    @property
    def transformer(self) -> torch.nn.Module:
        return self._m3.transformer

    def encode_joint(self, texts: Sequence[str]) -> Iterator[
            tuple[np.ndarray, np.ndarray, list[SparseRow], list[np.ndarray] | None]]:
        """Yield (row_indices int64 [b], dense float32 [b, dim], sparse rows, ColBERT [n_i, dim] per row | None)."""
        yield from self._m3.batches(texts, dense=True, sparse=True, colbert=self.return_colbert,
                                    top_k=self.spec.top_k)

    def decode_terms(self, term_ids: Sequence[int]) -> list[str]:
        return self._m3.hf_tokenizer.convert_ids_to_tokens([int(t) for t in term_ids])

    def close(self) -> None:
        self._m3.close()


class FlagRerankerAdapter(Reranker):
    """FlagReranker.compute_score over length-sorted batches of pairs; halves the batch on CUDA OOM.

    Scores are FlagReranker's raw logits (no sigmoid). `compute_fn` is the scoring call
    (FlagReranker.compute_score); it is an attribute so callers and tests can wrap it.
    """

    def __init__(self, spec: ModelSpec, device: str | Sequence[str] = "cpu", *, batch_size: int = 32,
                 max_oom_retries: int = RERANK_MAX_OOM_RETRIES):
        self.spec = spec
        self.device = _check_device(spec, device)
        self.batch_size = int(batch_size)
        self.max_oom_retries = int(max_oom_retries)
        dtype = _half_dtype(spec, self.device)
        # FlagReranker has fp16 only: bf16 requests run as fp16 on CUDA.
        dtype = "float32" if dtype == "float32" else "float16"
        self.stats = EncodeStats(model=spec.name, backend=BACKEND, device=str(self.device), dtype=dtype)

        from FlagEmbedding import FlagReranker  # outside the load timer: the import is a one-off ~4 s

        def load(path: str):
            return FlagReranker(path, use_fp16=dtype == "float16", devices=str(self.device),
                                max_length=spec.max_length, batch_size=self.batch_size, normalize=False)

        t0 = time.perf_counter()
        # Only spec.source: load_reranker in the factory walks the fallbacks itself (one adapter per
        # source) and records which one loaded.
        self.source = spec.source
        try:
            self._reranker = load(spec.resolve_source())
        except Exception as exc:
            raise EncoderError(f"model {spec.name}: cannot load reranker {spec.source!r}: {type(exc).__name__}: {exc}") from exc
        self.stats.load_seconds = time.perf_counter() - t0
        _check_max_length(spec, self._reranker.model.config, self.source)
        self.scorer_id = f"flag-reranker:{self.source}"
        self.compute_fn: Callable[..., list[float]] = self._reranker.compute_score
        self.stats.token_budget_start = self.stats.token_budget_final = self.batch_size

    def _token_lengths(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        enc = self._reranker.tokenizer(
            [q for q, _ in pairs], [p for _, p in pairs], truncation=True, max_length=self.spec.max_length,
            padding=False, return_attention_mask=False, return_token_type_ids=False,
        )
        return np.fromiter((len(ids) for ids in enc["input_ids"]), dtype=np.int64, count=len(pairs))

    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        pairs = list(pairs)
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                raise EncoderError(f"model {self.spec.name}: pair {i} is not a (query, passage) pair of strings")
        scores = np.zeros(len(pairs), dtype=np.float32)
        if not pairs:
            return scores
        t_wall = time.perf_counter()
        t0 = time.perf_counter()
        lengths = self._token_lengths(pairs)
        self.stats.tokenize_seconds += time.perf_counter() - t0
        order = np.argsort(-lengths, kind="stable")  # similar lengths together: less padding
        start = 0
        while start < len(order):
            rows, retries = order[start:start + self.batch_size], 0
            while True:
                t0 = time.perf_counter()
                try:
                    # batch_size one above the rows: one forward for the whole batch, and FlagEmbedding
                    # hides its per-call progress bars when batch_size exceeds the input.
                    out = self.compute_fn([pairs[j] for j in rows], batch_size=len(rows) + 1,
                                          max_length=self.spec.max_length)
                    break
                except Exception as exc:
                    if not is_oom(exc):
                        raise
                    if retries >= self.max_oom_retries or self.batch_size == 1:
                        raise EncoderError(
                            f"model {self.spec.name}: out of device memory on {self.device} scoring {len(rows)} pairs "
                            f"after {retries} batch halvings"
                        ) from exc
                    del exc
                    _release(self.device)
                    retries += 1
                    old, self.batch_size = self.batch_size, max(1, self.batch_size // 2)
                    self.stats.oom_mitigations.append({
                        "event": "oom_backoff", "batch_index": len(self.stats.batches), "old_budget": old,
                        "new_budget": self.batch_size, "device": str(self.device), "unit": "pairs",
                    })
                    self.stats.token_budget_final = self.batch_size
                    rows = order[start:start + self.batch_size]
            batch_scores = np.asarray(out, dtype=np.float32).reshape(-1)
            if len(batch_scores) != len(rows):
                raise EncoderError(f"model {self.spec.name}: got {len(batch_scores)} scores for {len(rows)} pairs")
            scores[rows] = batch_scores
            row_lengths = lengths[rows]
            self.stats.batches.append(BatchRecord(
                items=len(rows), tokens=int(row_lengths.sum()), padded_tokens=int(row_lengths.max()) * len(rows),
                seconds=time.perf_counter() - t0, token_budget=self.batch_size,
            ))
            start += len(rows)
        self.stats.wall_seconds += time.perf_counter() - t_wall
        return scores

    def close(self) -> None:
        self._reranker.model.to("cpu")
        del self._reranker, self.compute_fn
        _release(self.device)
