"""Code versions of the assets (one constant each) and the data version each output carries.

Bump an asset's constant when its logic changes what it stores: Dagster then reports it, and
everything downstream, as unsynced. Without a code version Dagster takes the run id as one, so
every rerun -- even a no-op -- would mark the whole downstream graph changed.
"""

from __future__ import annotations

import hashlib
import json

import dagster as dg
import pyarrow as pa

from rag_clean.config.models import declared_identity
from rag_clean.config.registry import ModelSpec, Registry
from rag_clean.stages.context import StageOutput

CHUNKS = "2"  # 2: documents packed by the strictest model's real tokenizer (chunks_code_version)
DENSE = "1"
FUSED = "2"   # 2: schema metadata `inputs` (dense fingerprints), rows reused from the previous file
SPARSE = "2"  # 2: content_hash column, each model's rows in chunk order, fingerprint.<model> metadata
QUERIES = "1"
RERANKED = "1"
EXPORTS = "1"
INDEX = "1"


# Dagster's tag for an asset event's data version (dagster._core.definitions.data_version.DATA_VERSION_TAG).
DATA_VERSION_TAG = "dagster/data_version"
STATUS_TAG = "rag_clean/status"


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def dense_code_version(spec: ModelSpec) -> str:
    """The dense asset's version plus what the registry declares about its model (source, fallbacks,
    pooling, max length, dtype, dims, encoder code version): editing the entry is a code change of that
    asset (its vectors change), so it and its downstream become unsynced. Declared configuration only:
    building the graph reads no weight file. New weights under an unchanged source are caught where rows
    are reused (the model fingerprint hashes the folder: rag_clean.config.models)."""
    return f"{DENSE}-{_digest(declared_identity(spec))}"


def chunks_code_version(registry: Registry) -> str:
    """The chunks asset's version plus the tokenizer and max length documents are packed by: a registry edit
    that changes the strictest tokenizer changes chunk boundaries (and the ids `<file>#<index>` after them);
    one that does not leaves chunks in sync. The one code version that opens model folders: their tokenizer
    and config files only (rag_clean.encoders.chunk_tokens), no weight file."""
    from rag_clean.encoders.chunk_tokens import packing_identity

    return f"{CHUNKS}-{_digest(packing_identity(registry))}"


# The other assets that read registry entries, likewise: an edit there is a code change of that asset.
def sparse_code_version(registry: Registry) -> str:
    return f"{SPARSE}-{_digest([declared_identity(s) for s in registry.sparse])}"


def fused_code_version(registry: Registry) -> str:
    """Fusion method and the dense models' weights (the fused vectors are built with them)."""
    return f"{FUSED}-{_digest([registry.fusion_method, [(s.name, float(s.weight)) for s in registry.dense]])}"


def reranked_code_version(registry: Registry) -> str:
    spec = registry.rerank
    return f"{RERANKED}-{_digest(None if spec is None else declared_identity(spec))}"


def table_data_version(table: pa.Table) -> dg.DataVersion:
    """A digest of the table's content (Arrow IPC bytes: equal tables give equal bytes)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return dg.DataVersion(hashlib.sha256(sink.getvalue()).hexdigest()[:24])


def _previous_data_version(context: dg.AssetExecutionContext) -> dg.DataVersion | None:
    record = context.instance.get_latest_data_version_record(context.asset_key, False, context.partition_key)
    materialization = record.asset_materialization if record is not None else None
    version = (materialization.tags or {}).get(DATA_VERSION_TAG) if materialization is not None else None
    return dg.DataVersion(version) if version else None


def versioned(context: dg.AssetExecutionContext, output: StageOutput) -> dg.Output:
    """The asset's return value with its data version and status tag.

    - Tables (and finished spools: the sha256 of the staged file, streamed) get a content digest: `chunks` and `queries` read files Dagster does not track, so
      code version + inputs alone would call an edited collection unchanged; for the others a
      rerun that produces the same rows keeps the same version.
    - A disabled stage writes nothing and the stored file is the previous one, so it keeps the previous
      data version: downstream is not reported changed by a stage that did not run. (Without a
      previous materialization Dagster's default applies.)
    - Streamed embedding files use Dagster's default (code version + upstream data versions).
    """
    data_version = None
    if output.disabled:
        data_version = _previous_data_version(context)
    elif isinstance(output.value, pa.Table):
        data_version = table_data_version(output.value)
    elif getattr(output.value, "content_digest", None):  # a finished ColumnSpool: the staged file's sha256
        data_version = dg.DataVersion(output.value.content_digest[:24])
    # Every asset returns through here: the run log's one line per stage on reused vs computed work.
    line = output.record.reuse_line(context.asset_key.to_user_string())
    if line:
        context.log.info(line)
    tags = {STATUS_TAG: "disabled" if output.disabled else output.record.status}
    return dg.Output(output, data_version=data_version, tags=tags)
