"""Telemetry IO manager: stores each asset value, then hands its stage record to telemetry.

A thin adapter: the file goes where the storage layout says (Parquet tables; Arrow IPC files --
chunks and embedding matrices -- loaded memory-mapped). A value that follows the staged-file protocol
(`rag_clean.storage.staged.Staged`: every writer, side files attached to it) is published by its one
`publish()`, which removes what it staged if it fails. `rag_clean.telemetry.summary.record_materialization` merges
the record into processing_summary.json and the events log and returns the metadata, which is
converted to Dagster metadata here. A disabled stage writes no file: the previous one stays.
"""


from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.telemetry.memory import PROBE
from rag_clean.telemetry.records import MetaJson, MetaMarkdown, MetaPath
from rag_clean.stages.context import StageOutput
from rag_clean.storage.layout import is_embedding_file
from rag_clean.storage.arrow_io import read_arrow_table, write_arrow_table
from rag_clean.storage.embeddings import read_embeddings
from rag_clean.storage.errors import StorageError
from rag_clean.storage.parquet import read_table, write_table
from rag_clean.storage.staged import Staged
from rag_clean.telemetry.summary import record_materialization, utc_now
from resources.columns import column_schema_metadata
from resources.paths import PathsResource

# Stages that can be switched off (sparse toggle, dense models outside ensemble_models): a missing
# file loads as None so the consumer decides, instead of failing the whole downstream graph.
OPTIONAL_INPUT_ROOTS = ("sparse_vectors", "dense_embeddings")
# AssetIn metadata: hand the consumer an open pyarrow.parquet.ParquetFile instead of the whole table.
LAZY_INPUT = "rag_clean/lazy"

def to_dagster_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Engine metadata -> Dagster metadata (path/JSON markers; numpy scalars become Python numbers)."""
    out = {}
    for key, value in metadata.items():
        if isinstance(value, MetaPath):
            value = dg.MetadataValue.path(value.path)
        elif isinstance(value, MetaJson):
            value = dg.MetadataValue.json(value.value)
        elif isinstance(value, MetaMarkdown):
            value = dg.MetadataValue.md(value.text)
        elif hasattr(value, "item") and callable(value.item):
            value = value.item()
        out[key] = value
    return out


def stored_table_metadata(path: Path) -> dict[str, Any]:
    """Dagster's standard `dagster/row_count` and `dagster/column_schema` (with the column descriptions the
    engine's schema gave the file) of the file just published, read from its footer / schema: what the UI
    shows in its table and lineage views."""
    if path.suffix == ".parquet":
        meta = pq.ParquetFile(str(path)).metadata
        return {"dagster/row_count": int(meta.num_rows), **column_schema_metadata(meta.schema.to_arrow_schema())}
    if path.suffix == ".arrow":
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)
            rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
            schema = reader.schema
        return {"dagster/row_count": int(rows), **column_schema_metadata(schema)}
    return {}


def _collection(context: dg.OutputContext | dg.InputContext) -> str:
    """The one collection of this step. A run launched by a backfill with a backfill policy carries a
    partition range (start == end here: multi_run(max_partitions_per_run=1)), not a partition key."""
    if context.has_partition_key:
        return context.partition_key
    keys = list(context.asset_partition_keys) if context.has_asset_partitions else []
    if len(keys) != 1:
        raise StorageError(f"asset {context.asset_key.to_user_string()} must be materialized for one collection "
                           f"partition, got {len(keys)}")
    return keys[0]


class TelemetryIOManager(dg.ConfigurableIOManager):
    paths: dg.ResourceDependency[PathsResource]

    def setup_for_execution(self, context) -> None:
        PROBE.start()  # sample from the start of the step process

    def _file(self, context: dg.OutputContext | dg.InputContext) -> Path:
        return self.paths.layout().asset_file(list(context.asset_key.path), _collection(context))

    def handle_output(self, context: dg.OutputContext, obj: StageOutput) -> None:
        if not isinstance(obj, StageOutput):
            raise TypeError(f"{context.asset_key.to_user_string()}: expected a StageOutput, got {type(obj).__name__}")
        path = self._file(context)
        record = obj.record
        record.asset_key, record.run_id = context.asset_key.to_user_string(), context.run_id
        record.partition, record.materialized_at = _collection(context), utc_now()
        if obj.disabled:
            record.status, record.path, record.bytes = "disabled", None, 0
        elif isinstance(obj.value, Staged):  # any staged writer; its side files are published with it
            if Path(obj.value.path) != path:  # both come from the layout: a mismatch is a wiring bug
                obj.value.abort()
                raise StorageError(f"{record.asset_key}: staged for {obj.value.path}, but the layout says {path}")
            if getattr(obj.value, "root", False) is None:
                obj.value.root = self.paths.layout().root  # named by a disk-full error
            obj.value.publish()  # on failure it removed what it staged; the previous file stays
            record.path, record.bytes = str(path), path.stat().st_size
        elif isinstance(obj.value, pa.Table):
            write = write_arrow_table if path.suffix == ".arrow" else write_table
            record.bytes, record.path = write(obj.value, path), str(path)
        else:
            raise TypeError(f"{record.asset_key}: unsupported value type {type(obj.value).__name__}")
        # The step's window: since the previous output stored in this process (or the process start):
        # loading inputs, the body, and storing this output. One process per step (multiprocess executor)
        # makes it the step's own peak; in-process, checks run between steps fall into the next window.
        record.peak_rss_anon_bytes = PROBE.take()
        metadata = to_dagster_metadata(record_materialization(self.paths.layout(), record))
        if not obj.disabled:  # a disabled stage stored nothing this run: no row count to claim
            metadata |= stored_table_metadata(path)
        context.add_output_metadata(metadata)

    def load_input(self, context: dg.InputContext) -> Any:
        path = self._file(context)
        if not path.exists():
            if context.asset_key.path[0] in OPTIONAL_INPUT_ROOTS:
                return None  # absent when the stage was disabled; consumers that need it say so
            raise StorageError(
                f"{path} does not exist: materialize {context.asset_key.to_user_string()} for {_collection(context)!r} first"
            )
        if path.suffix == ".parquet" and (context.definition_metadata or {}).get(LAZY_INPUT):
            # The consumer reads it block by block (row groups): nothing is decoded up front.
            return pq.ParquetFile(str(path), memory_map=True)
        if path.suffix == ".arrow":
            # Memory-mapped: the loaded value's buffers are file pages (zero-copy, no anonymous memory).
            return read_embeddings(path) if is_embedding_file(context.asset_key.path) else read_arrow_table(path)
        return read_table(path)
