"""Asset checks, partitioned like their assets (an unpartitioned check would load every partition)."""


import hashlib
from collections import Counter
from pathlib import Path
from typing import Optional

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rag_clean.config.registry import Registry
from rag_clean.index import open_collection_index
from rag_clean.stages.common import ROW_BLOCK
from rag_clean.chunking.duplicates import duplicate_id_rows
from rag_clean.storage.arrow_io import as_string_array, ids_absent
from rag_clean.storage.digests import file_digest
from rag_clean.storage.embeddings import EmbeddingSet
from rag_clean.storage.parquet import read_table
from rag_clean.telemetry.summary import read_summary
from rag_clean_assets.assets.dense import dense_asset_key
from rag_clean_assets.assets.exports import EXPORTS_KEY
from rag_clean_assets.assets.fused import FUSED_KEY
from rag_clean_assets.degraded import DEGRADED_CHECKS
from rag_clean_assets.assets.index import INDEX_KEY
from rag_clean_assets.partitions import collections_partitions
from rag_clean_assets.quality import QUALITY_CHECKS
from resources.paths import PathsResource
from resources.settings import EmbedderSettingsResource

NORM_TOLERANCE = 1e-3
# Rows per block in the streaming checks: small enough that a check's working memory is a few MB,
# whatever the collection size or the vector width.
CHECK_BLOCK = 8192



def _vector_problems(vectors: EmbeddingSet, expected_rows: int, expected_ids: pa.ChunkedArray, expected_dim: int | None) -> tuple[list[str], dict]:
    problems = []
    if len(vectors) != expected_rows:
        problems.append(f"{len(vectors)} rows, chunks has {expected_rows}")
    # Arrow equality over the two memory-mapped id columns: no Python list of every id.
    if not as_string_array(expected_ids).equals(vectors.ids):
        problems.append("chunk_ids differ from the chunks table (order or content)")
    if expected_dim is not None and vectors.dim != expected_dim:
        problems.append(f"dim {vectors.dim}, expected {expected_dim}")
    nan_rows = 0
    worst = 0.0
    for start in range(0, len(vectors), CHECK_BLOCK):
        # Squared norms straight from the memory-mapped rows: the only temporaries are one float64 copy
        # of a small block and one value per row (a NaN or inf anywhere makes the row's sum non-finite).
        block = vectors.vectors[start:start + CHECK_BLOCK]
        squared = np.einsum("ij,ij->i", block, block, dtype=np.float64)
        finite = np.isfinite(squared)
        nan_rows += int((~finite).sum())
        if finite.any():
            worst = max(worst, float(np.abs(np.sqrt(squared[finite]) - 1.0).max()))
    if nan_rows:
        problems.append(f"{nan_rows} rows with NaN/inf")
    if worst > NORM_TOLERANCE:
        problems.append(f"norms off unit by up to {worst:.2e}")
    return problems, {"rows": len(vectors), "dim": vectors.dim, "nan_rows": nan_rows, "max_norm_error": worst}


def _result(problems: list[str], metadata: dict) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=not problems, description="; ".join(problems) or "ok", metadata=metadata)


@dg.asset_check(asset="chunks", partitions_def=collections_partitions, description="non-empty, unique ids, hashes match text")
def chunks_valid(chunks: pa.Table) -> dg.AssetCheckResult:
    # Streaming over the memory-mapped table: ids by sorted hashes, texts in blocks.
    problems = []
    if not chunks.num_rows:
        problems.append("no chunks")
    duplicates = duplicate_id_rows(chunks.column("chunk_id"))
    if duplicates:
        problems.append(f"{sum(len(g) - 1 for g in duplicates)} duplicate chunk ids")
    bad_hash = empty = 0
    for start in range(0, chunks.num_rows, ROW_BLOCK):
        block = chunks.slice(start, ROW_BLOCK)
        texts = block.column("text").to_pylist()
        bad_hash += sum(hashlib.sha256(t.encode("utf-8")).hexdigest() != h
                        for t, h in zip(texts, block.column("content_hash").to_pylist()))
        empty += sum(1 for t in texts if not t.strip())
    if bad_hash:
        problems.append(f"{bad_hash} content hashes do not match their text")
    if empty:
        problems.append(f"{empty} empty texts")
    return _result(problems, {"rows": chunks.num_rows})


def build_dense_check(spec) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=dense_asset_key(spec), name="vectors_valid", partitions_def=collections_partitions,
                    additional_ins={"chunks": dg.AssetIn("chunks")},
                    description=f"rows match chunks, no NaN, unit norms, dim = {spec.output_dim} (registry)")
    def _check(chunks: pa.Table, **inputs: Optional[EmbeddingSet]) -> dg.AssetCheckResult:
        vectors = next(iter(inputs.values()))
        if vectors is None:
            return dg.AssetCheckResult(passed=True, metadata={"status": "disabled"},
                                       description="not applicable: the model is outside ensemble_models and has no stored file")
        problems, meta = _vector_problems(vectors, chunks.num_rows, chunks.column("chunk_id"), spec.output_dim)
        return _result(problems, meta)

    return _check


@dg.asset_check(asset=FUSED_KEY, name="vectors_valid", partitions_def=collections_partitions,
                additional_ins={"chunks": dg.AssetIn("chunks")}, description="rows match chunks, no NaN, unit norms")
def fused_valid(chunks: pa.Table, fused_embeddings: EmbeddingSet) -> dg.AssetCheckResult:
    problems, meta = _vector_problems(fused_embeddings, chunks.num_rows, chunks.column("chunk_id"), None)
    return _result(problems, meta)


def _sparse_block_problems(batch: pa.RecordBatch) -> tuple[int, int]:
    """(malformed rows, empty rows) of one block, in numpy: ids and weights of equal length, weights finite,
    positive and non-increasing within each row."""
    ids, weights = batch.column("term_ids"), batch.column("weights")
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
    bad = lengths != pc.list_value_length(weights).to_numpy(zero_copy_only=False)
    w = pc.list_flatten(weights).to_numpy(zero_copy_only=False)
    row_of = np.repeat(np.arange(len(batch)), pc.list_value_length(weights).to_numpy(zero_copy_only=False))
    wrong = ~np.isfinite(w) | (w <= 0)
    rising = np.zeros(len(w), dtype=bool)
    if len(w) > 1:
        rising[1:] = (np.diff(w) > 1e-6) & (row_of[1:] == row_of[:-1])
    bad[np.unique(row_of[wrong | rising])] = True
    return int(bad.sum()), int((lengths == 0).sum())


def sparse_rows_result(chunks: pa.Table, batches) -> dg.AssetCheckResult:
    """The sparse check over stored rows given as record batches, in file order."""
    chunk_ids = chunks.column("chunk_id").cast(pa.string())
    n = chunks.num_rows
    next_row: dict[str, int] = {}   # model -> the chunk row its next stored row must be
    out_of_order: set[str] = set()
    rows = bad = empty = 0
    for batch in batches:
        rows += batch.num_rows
        model_col = batch.column("model")
        for model in pc.unique(model_col).to_pylist():
            ids = batch.filter(pc.equal(model_col, model)).column("chunk_id").cast(pa.string())
            start = next_row.get(model, 0)
            if start + len(ids) > n or not pa.chunked_array([ids]).equals(chunk_ids.slice(start, len(ids))):
                out_of_order.add(model)
            next_row[model] = start + len(ids)
        b, e = _sparse_block_problems(batch)
        bad, empty = bad + b, empty + e
    models = sorted(next_row)
    problems = []
    expected = n * len(models)
    if rows != expected:
        problems.append(f"{rows} rows, expected {expected} ({len(models)} models x {n} chunks)")
    for model in models:
        if model in out_of_order or next_row[model] != n:
            problems.append(f"rows of {model} are not one per chunk in chunk order")
    if bad:
        problems.append(f"{bad} malformed rows")
    return _result(problems, {"rows": rows, "models": ", ".join(models), "empty_rows": empty})


@dg.asset_check(asset="sparse_vectors", partitions_def=collections_partitions,
                additional_ins={"chunks": dg.AssetIn("chunks")},
                description="each model: one row per chunk, in chunk order; finite positive weights, ids sorted by weight")
def sparse_valid(context: dg.AssetCheckExecutionContext, chunks: pa.Table, paths: PathsResource) -> dg.AssetCheckResult:
    # The stored file is read here row group by row group (not loaded as an input, which would decode it
    # whole): memory stays flat in the collection size.
    path = paths.layout().asset_file(["sparse_vectors"], context.partition_key)
    if not path.exists():
        return dg.AssetCheckResult(passed=True, description="not applicable: the sparse stage is disabled and has no stored file",
                                   metadata={"status": "disabled"})
    batches = pq.ParquetFile(str(path), memory_map=True).iter_batches(
        batch_size=CHECK_BLOCK, columns=["chunk_id", "model", "term_ids", "weights"])
    return sparse_rows_result(chunks, batches)


@dg.asset_check(asset="reranked", partitions_def=collections_partitions,
                additional_ins={"chunks": dg.AssetIn("chunks"), "queries": dg.AssetIn("queries")},
                description="every query ranked, ranks contiguous, chunk ids known, scores finite")
def reranked_valid(chunks: pa.Table, queries: pa.Table, reranked: pa.Table) -> dg.AssetCheckResult:
    problems = []
    qids = reranked.column("query_id").to_pylist()
    missing = set(queries.column("query_id").to_pylist()) - set(qids)
    if missing:
        problems.append(f"{len(missing)} queries without results")
    # The ranked ids (queries x top-k) against the chunk_id column in Arrow: no set of every chunk id.
    cited = reranked.column("chunk_id").to_pylist()
    absent = ids_absent(set(cited), chunks.column("chunk_id"))
    unknown = sum(1 for c in cited if c in absent)
    if unknown:
        problems.append(f"{unknown} unknown chunk ids")
    ranks: dict[str, list[int]] = {}
    for q, r in zip(qids, reranked.column("rank").to_pylist()):
        ranks.setdefault(q, []).append(r)
    if any(sorted(r) != list(range(1, len(r) + 1)) for r in ranks.values()):
        problems.append("ranks are not 1..n per query")
    scores = np.array([s for s in reranked.column("rerank_score").to_pylist() if s is not None], dtype=np.float32)
    if len(scores) and not np.isfinite(scores).all():
        problems.append("non-finite rerank scores")
    return _result(problems, {"rows": reranked.num_rows, "queries": len(ranks)})


@dg.asset_check(asset="queries", partitions_def=collections_partitions,
                additional_ins={"chunks": dg.AssetIn("chunks")},
                description="unique query ids, every gold chunk id exists in chunks")
def queries_valid(chunks: pa.Table, queries: pa.Table) -> dg.AssetCheckResult:
    qids = queries.column("query_id").to_pylist()
    problems = []
    duplicates = sorted(q for q, n in Counter(qids).items() if n > 1)
    if duplicates:
        problems.append(f"{len(duplicates)} duplicate query ids: {', '.join(duplicates[:5])}")
    gold = {g for ids in queries.column("gold_chunk_ids").to_pylist() for g in (ids or [])}
    unknown = sorted(ids_absent(gold, chunks.column("chunk_id")))
    if unknown:
        problems.append(f"{len(unknown)} gold chunk ids not in chunks: {', '.join(unknown[:5])}")
    return _result(problems, {"queries": len(qids), "duplicate_ids": len(duplicates), "unknown_gold_ids": len(unknown)})


@dg.asset_check(asset=EXPORTS_KEY, name="exports_valid", partitions_def=collections_partitions,
                description="every file in the manifest exists with the recorded size and sha256")
def exports_valid(context: dg.AssetCheckExecutionContext, paths: PathsResource) -> dg.AssetCheckResult:
    # Reads the manifest itself instead of taking the asset as input: exports is off by default, and a
    # disabled stage stores no manifest, which the IO manager would refuse to load.
    layout = paths.layout()
    collection = context.partition_key
    summary_file = layout.summary_file(collection)
    record = read_summary(summary_file).get("stages", {}).get(EXPORTS_KEY.to_user_string()) if summary_file.exists() else None
    if not record or record.get("status") == "disabled":
        return dg.AssetCheckResult(passed=True, metadata={"status": "disabled"},
                                   description="not applicable: exports are disabled for this collection")
    manifest = read_table(layout.asset_file(list(EXPORTS_KEY.path), collection)).to_pylist()
    folder = Path(record["export_dir"])
    problems = []
    for entry in manifest:
        path = folder / entry["name"]
        if not path.is_file():
            problems.append(f"{entry['name']} missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{entry['name']} is {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif file_digest(path) != entry["sha256"]:
            problems.append(f"{entry['name']} sha256 differs from the manifest")
    return _result(problems, {"files": len(manifest), "export_dir": dg.MetadataValue.path(str(folder))})


@dg.asset_check(asset=INDEX_KEY, name="index_matches_chunks", partitions_def=collections_partitions,
                additional_ins={"chunks": dg.AssetIn("chunks")},
                description="the index holds one point per chunk (same chunk ids) with the chunk's content hash")
def index_matches_chunks(context: dg.AssetCheckExecutionContext, chunks: pa.Table,
                         settings: EmbedderSettingsResource, paths: PathsResource) -> dg.AssetCheckResult:
    # Reads the index itself (streamed ids and hashes), not the asset's one-row value.
    from rag_clean.index.sync import index_drift

    resolved = settings.resolve()
    if resolved.index_sink == "off":
        return dg.AssetCheckResult(passed=True, metadata={"status": "disabled"},
                                   description="not applicable: index_sink=off")
    index = open_collection_index(resolved, paths.layout(), context.partition_key)
    try:
        drift = index_drift(index, chunks)
    finally:
        index.close()
    problems = [f"{drift[k]} {what}" for k, what in (("missing", "chunks without a point"),
                                                      ("extra", "points without a chunk"),
                                                      ("changed", "points with another content hash")) if drift[k]]
    if problems and drift["examples"]:
        problems.append(f"e.g. {', '.join(drift['examples'][:5])}")
    return _result(problems, {"points": int(drift["points"]), "chunks": chunks.num_rows, "sink": index.sink,
                              "location": index.location})


def build_checks(registry: Registry) -> list:
    return [chunks_valid, fused_valid, sparse_valid, reranked_valid, queries_valid, exports_valid, index_matches_chunks,
            *(build_dense_check(s) for s in registry.dense), *QUALITY_CHECKS, *DEGRADED_CHECKS]
