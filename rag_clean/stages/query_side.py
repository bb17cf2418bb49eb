"""The query side of the reranked stage: each model's query vectors (and the masked gold chunks' vectors),
from the retrieval caches where they hold them, else encoded one text per forward; the stored sparse rows
read block by block for the sparse candidate scorers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rag_clean.config.models import ResolvedModel
from rag_clean.config.registry import ModelSpec
from rag_clean.retrieval.cache import RetrievalCaches, fingerprint
from rag_clean.retrieval.candidates import SparseBlock, SparseScorer
from rag_clean.retrieval.flat import chunk_rows
from rag_clean.retrieval.sparse_scan import sparse_scan_device
from rag_clean.retrieval.ranking import encode_dense_texts, encode_sparse_texts, first_line, model_query_vectors
from rag_clean.telemetry.progress import ProgressLog
from rag_clean.telemetry.records import RerankRecord

log = logging.getLogger(__name__)

SparseSource = pa.Table | pq.ParquetFile | Path | str
# Sparse rows per block: each block becomes a small inverted index (~50 bytes per posting while built), so
# smaller blocks keep the peak low; more blocks cost more per-query index lookups (linear, cheap).
SPARSE_BLOCK_ROWS = 16384


def _record_batches(sparse: SparseSource, columns: list[str]) -> Iterator[pa.RecordBatch]:
    if isinstance(sparse, pa.Table):
        yield from sparse.select(columns).to_batches(max_chunksize=SPARSE_BLOCK_ROWS)
        return
    source = sparse if isinstance(sparse, pq.ParquetFile) else pq.ParquetFile(str(sparse), memory_map=True)
    yield from source.iter_batches(batch_size=SPARSE_BLOCK_ROWS, columns=columns)


def sparse_blocks(sparse: SparseSource, model: str, chunks: pa.Table) -> Callable[[], Iterator[SparseBlock]]:
    """The stored rows of one model as (chunk rows, lengths, flat term ids, flat weights) blocks. Rows written
    in chunk order map by position; any other order is joined on chunk_id (Arrow hash lookup)."""
    ids_column = chunks.column("chunk_id")

    def blocks() -> Iterator[SparseBlock]:
        cursor = 0
        for batch in _record_batches(sparse, ["chunk_id", "model", "term_ids", "weights"]):
            same = pc.equal(batch.column("model"), model)
            sub = batch if pc.all(same).as_py() else batch.filter(same)  # one model per file: no copy
            n = sub.num_rows
            if not n:
                continue
            ids = sub.column("chunk_id")
            if cursor >= 0 and cursor + n <= len(ids_column) and \
                    ids_column.slice(cursor, n).cast(pa.string()).equals(pa.chunked_array([ids]).cast(pa.string())):
                rows, keep = np.arange(cursor, cursor + n, dtype=np.int64), None
                cursor += n
            else:
                cursor = -1  # not in chunk order: join every later block on chunk_id
                rows = chunk_rows(chunks, ids.to_pylist())
                keep = rows >= 0  # rows of chunks no longer in the collection are not candidates
            lengths = pc.list_value_length(sub.column("term_ids")).fill_null(0).to_numpy(zero_copy_only=False)
            terms = pc.list_flatten(sub.column("term_ids")).to_numpy(zero_copy_only=False)
            weights = pc.list_flatten(sub.column("weights")).to_numpy(zero_copy_only=False)
            if keep is not None and not keep.all():
                per_entry = np.repeat(keep, lengths)
                rows, lengths, terms, weights = rows[keep], lengths[keep], terms[per_entry], weights[per_entry]
            yield rows, lengths.astype(np.int64), terms, weights

    return blocks



def dense_query_side(specs: Sequence[ModelSpec], model_of: Callable[[ModelSpec], ResolvedModel], q_texts: list[str], q_keys: list[str], masked: dict[int, str],
                      m_keys: dict[int, str], device, caches: RetrievalCaches, record: RerankRecord, progress=None):
    """Per model: query vectors and the masked gold chunks' vectors, from the cache where it has them; the
    rest encoded one text per forward (one model on the device at a time, and only if something is missing).
    `progress` (StageContext.progress) gets done/total, rate and ETA lines while they are encoded."""
    from rag_clean.encoders.factory import load_dense_encoder

    queries, overrides = [], []
    rows = sorted(masked)
    first_q = {k: i for i, k in reversed(list(enumerate(q_keys)))}
    text_of_m = {m_keys[r]: masked[r] for r in rows}
    for spec in specs:
        fp = fingerprint(model_of(spec).fingerprint, device, query_instruction=spec.query_instruction or "")
        qc = caches.open("query_vectors", spec, "vector", fp)
        mc = caches.open("masked_gold", spec, "vector", fp)
        need_q, need_m = qc.missing(q_keys), mc.missing(m_keys[r] for r in rows)
        if need_q or need_m:
            encoder = load_dense_encoder(spec, device, model=model_of(spec))
            try:
                if need_q:
                    meter = ProgressLog(f"{spec.name} queries", len(need_q), progress, unit="queries")
                    vectors = encode_dense_texts(encoder, [q_texts[first_q[k]] for k in need_q], device, queries=True,
                                                 progress=meter)
                    for k, v in zip(need_q, vectors):
                        qc.put(k, v)
                if need_m:
                    meter = ProgressLog(f"{spec.name} masked gold", len(need_m), progress)
                    vectors = encode_dense_texts(encoder, [text_of_m[k] for k in need_m], device, queries=False,
                                                 progress=meter)
                    for k, v in zip(need_m, vectors):
                        mc.put(k, v)
            finally:
                encoder.close()
        width = spec.truncate_dim or spec.dim
        native = np.stack([qc.get(k) for k in q_keys]) if q_keys else np.zeros((0, width or 0), np.float32)
        queries.append(model_query_vectors(spec, native))
        if rows:
            docs = model_query_vectors(spec, np.stack([mc.get(m_keys[r]) for r in rows]))
            overrides.append(dict(zip(rows, docs)))
        else:
            overrides.append({})
        record.reuse_counts[f"query_vectors/{spec.name}"] = qc.count("queries")
        if rows:
            record.reuse_counts[f"masked_gold/{spec.name}"] = mc.count("chunks")
    return queries, overrides


def sparse_scorers(specs, model_of: Callable[[ModelSpec], ResolvedModel], sparse: SparseSource, chunks: pa.Table, q_texts, q_keys, masked: dict[int, str],
                    m_keys: dict[int, str], device, caches: RetrievalCaches, record, emptied: Sequence[int] = (),
                    progress=None):
    """One scorer per sparse model that can encode the queries (with the masked gold rows swapped in; the
    rows in `emptied`, gold chunks the mask left empty, have no terms). `progress` as for dense_query_side."""
    from rag_clean.encoders.factory import load_sparse_encoder

    scorers, names = [], []
    rows = sorted(masked)
    first_q = {k: i for i, k in reversed(list(enumerate(q_keys)))}
    text_of_m = {m_keys[r]: masked[r] for r in rows}
    for spec in specs:
        fp = fingerprint(model_of(spec).fingerprint, device, top_k=getattr(spec, "top_k", None))
        qc = caches.open("sparse_queries", spec, "sparse", fp)
        mc = caches.open("sparse_masked", spec, "sparse", fp)
        need_q, need_m = qc.missing(q_keys), mc.missing(m_keys[r] for r in rows)
        if need_q or need_m:
            try:
                encoder = load_sparse_encoder(spec, device, model=model_of(spec))
            except Exception as exc:
                # Chunks may hold metadata-fallback vectors, but queries have no metadata: leave this
                # model out of the candidates, say so, and keep the other systems.
                msg = (f"sparse candidates from {spec.name} skipped: its encoder cannot be loaded for the queries "
                       f"({type(exc).__name__}: {first_line(exc)})")
                log.debug(msg)  # surfaced once, by whoever runs the stage, from record.warnings
                record.warnings.append(msg)
                continue
            try:
                for cache, keys, texts, what, unit in (
                        (qc, need_q, [q_texts[first_q[k]] for k in need_q], "queries", "queries"),
                        (mc, need_m, [text_of_m[k] for k in need_m], "masked gold", "chunks")):
                    meter = ProgressLog(f"{spec.name} {what}", len(texts), progress, unit=unit)
                    for key, row in zip(keys, encode_sparse_texts(encoder, texts, device, meter)):
                        cache.put(key, row)
            finally:
                encoder.close()
        q_rows = [qc.get(k) for k in q_keys]
        overrides = {r: mc.get(m_keys[r]) for r in rows}
        overrides |= {r: (np.zeros(0, np.int64), np.zeros(0, np.float32)) for r in emptied}  # no terms left
        record.reuse_counts[f"sparse_queries/{spec.name}"] = qc.count("queries")
        if rows:
            record.reuse_counts[f"sparse_masked/{spec.name}"] = mc.count("chunks")
        scorers.append(SparseScorer(sparse_blocks(sparse, spec.name, chunks), chunks.num_rows, q_rows, overrides,
                                    device=sparse_scan_device(device)))
        names.append(f"sparse:{spec.name}")
    return scorers, names


