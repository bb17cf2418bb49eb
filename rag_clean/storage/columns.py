"""Column descriptions kept on the Arrow schemas themselves (field metadata `description`).

Each stored table's schema is declared once, in the engine, with what each column means; the description
travels into the stored Parquet / Arrow file, and the Dagster side reads it back from the same schema to
declare the asset's columns before any run (definition metadata) and from the file after one
(materialization metadata). No second list of columns exists anywhere.
"""

from __future__ import annotations

import pyarrow as pa

DESCRIPTION = b"description"


def column(name: str, type_: pa.DataType, description: str, *, nullable: bool = True) -> pa.Field:
    """An Arrow field that says what it holds."""
    return pa.field(name, type_, nullable=nullable, metadata={DESCRIPTION: description.encode("utf-8")})


def column_description(field: pa.Field) -> str | None:
    value = (field.metadata or {}).get(DESCRIPTION)
    return value.decode("utf-8") if value is not None else None
