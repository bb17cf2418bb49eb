"""An Arrow schema as Dagster's `TableSchema`: the one rendering of a table's columns for the UI.

Used twice, from the same engine schemas: by the asset definitions (`dagster/column_schema` in definition
metadata, so the catalog shows the columns before anything ran) and by the IO manager (the same key in
materialization metadata, read from the stored file). Descriptions come from the fields' metadata
(rag_clean.storage.columns).
"""

from __future__ import annotations

import re

import dagster as dg
import pyarrow as pa

from rag_clean.storage.columns import column_description

COLUMN_SCHEMA_KEY = "dagster/column_schema"


# A list's child field name is an encoding detail (Arrow writes "item", Parquet reads back "element"): shown
# without it, the declared and the stored type read the same (list<int32>, fixed_size_list<float>[384]).
_LIST_CHILD = re.compile(r"<(?:item|element): ")


def type_name(type_: pa.DataType) -> str:
    return _LIST_CHILD.sub("<", str(type_))


def table_schema(schema: pa.Schema) -> dg.TableSchema:
    return dg.TableSchema(columns=[
        dg.TableColumn(name=f.name, type=type_name(f.type), description=column_description(f)) for f in schema])


def column_schema_metadata(schema: pa.Schema) -> dict:
    return {COLUMN_SCHEMA_KEY: dg.MetadataValue.table_schema(table_schema(schema))}
