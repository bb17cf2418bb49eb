"""Pydantic schema of models.toml: every section, key and type, validated as a whole.

`rag_clean.config.registry` turns the validated tables into its frozen dataclasses; this module only says
what a valid file looks like and renders pydantic's error list as one line per problem.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# One list of the allowed values: the schema checks them, rag_clean.config.registry re-exports them.
ROLES = ("dense", "sparse", "rerank")
BACKENDS = ("sentence-transformers", "flagembedding")
DTYPES = ("auto", "float32", "float16", "bfloat16")
FUSION_METHODS = ("concat", "mean")

FLAG_CLASSES = ("bge-m3",)

# strict: TOML already types its values, so "32" for an int or true for a number is a mistake, not a
# value to coerce. extra="forbid": a misspelt key must fail instead of silently taking the default.
_TABLE = ConfigDict(strict=True, extra="forbid", frozen=True)


class ModelTable(BaseModel):
    """One [[models]] entry."""

    model_config = _TABLE

    name: str
    role: Literal["dense", "sparse", "rerank"]
    source: str = Field(min_length=1)
    backend: Literal["sentence-transformers", "flagembedding"] = "sentence-transformers"
    dim: int | None = Field(default=None, gt=0)
    pooling: str = "mean"
    max_length: int = Field(default=256, gt=0)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    weight: float = Field(default=1.0, gt=0)
    truncate_dim: int | None = Field(default=None, gt=0)
    top_k: int = Field(default=256, gt=0)
    flag_class: Literal["bge-m3"] | None = None
    colbert: bool = False
    fallbacks: list[str] = []
    query_instruction: str | None = None

    @field_validator("name")
    @classmethod
    def _name_has_identifier(cls, name: str) -> str:
        # The asset key is the name with non-alphanumerics dropped: it must keep something.
        if not any(c.isalnum() for c in name):
            raise ValueError(f"name {name!r} needs at least one letter or digit (it becomes the asset name)")
        return name

    @model_validator(mode="after")
    def _cross_field(self) -> ModelTable:
        if self.truncate_dim is not None and self.dim is not None and self.truncate_dim > self.dim:
            raise ValueError(f"truncate_dim {self.truncate_dim} > dim {self.dim}; vectors are never padded")
        if self.colbert and not (self.role == "dense" and self.backend == "flagembedding"
                                 and self.flag_class == "bge-m3"):
            raise ValueError('colbert = true needs role "dense", backend "flagembedding" and '
                             'flag_class "bge-m3" (only BGEM3FlagModel has a ColBERT head)')
        return self


class FusionTable(BaseModel):
    """The [fusion] section."""

    model_config = _TABLE

    method: Literal["concat", "mean"] = "concat"


class RegistryFile(BaseModel):
    """The whole file: an optional [fusion] section and one or more [[models]] entries."""

    model_config = _TABLE

    fusion: FusionTable = FusionTable()
    models: list[ModelTable] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> RegistryFile:
        # Names collide after asset-name normalisation too ("Tiny-A" and "tiny_a" are one asset key).
        seen: dict[str, int] = {}
        clashes = []
        for i, entry in enumerate(self.models):
            key = _asset_name(entry.name)
            if key in seen:
                clashes.append(f"models[{seen[key]}] and models[{i}] share the name {key!r}")
            else:
                seen[key] = i
        if clashes:
            raise ValueError("duplicate model names: " + "; ".join(clashes))
        return self


def _asset_name(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


# ---------------------------------------------------------------- error rendering

_SECTIONS = {(): RegistryFile, ("fusion",): FusionTable, ("models",): ModelTable}

_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "model_type": "a table",
    "dict_type": "a table",
}


def _table_of(loc: tuple) -> type[BaseModel] | None:
    """The schema table a location's last key belongs to: () top level, ("models", 3) one entry, ..."""
    parent = tuple(p for p in loc[:-1] if not isinstance(p, int))
    return _SECTIONS.get(parent)


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed(loc: tuple) -> str:
    table = _table_of(loc)
    return ", ".join(table.model_fields) if table else "?"


def _describe(error: dict[str, Any]) -> str:
    loc, kind, got = tuple(error["loc"]), error["type"], error.get("input")
    if kind == "extra_forbidden":
        what = "section" if len(loc) == 1 else "key"
        return f"unknown {what} {loc[-1]!r}; allowed: {_allowed(loc)}"
    if kind == "missing":
        if loc == ("models",):
            return "names no [[models]]; add at least one [[models]] table"
        return f"missing required key {loc[-1]!r} (required: {', '.join(_required(loc))})"
    if kind == "too_short" and loc == ("models",):
        return "names no [[models]]; add at least one [[models]] table"
    if kind == "list_type":
        return f"expected {'a list of strings' if loc[-1] == 'fallbacks' else 'an array of tables'}, got {got!r}"
    if kind == "literal_error":
        return f"must be one of {error['ctx']['expected']}, got {got!r}"
    if kind in ("greater_than", "greater_than_equal"):
        op = ">" if kind == "greater_than" else ">="
        bound = error["ctx"]["gt" if kind == "greater_than" else "ge"]
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound  # "> 0", not "> 0.0"
        return f"must be {op} {bound}, got {got!r}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {got!r}"
    return f"{error['msg']}, got {got!r}"


def _required(loc: tuple) -> list[str]:
    table = _table_of(loc)
    return [n for n, f in table.model_fields.items() if f.is_required()] if table else []


def render_errors(exc: ValidationError, source: str) -> str:
    """One line per problem: `<file>: models[2].weight: expected a number, got 'heavy'`."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        where = _where(loc)
        lines.append(f"{source}: {where + ': ' if where else ''}{_describe(error)}")
    head = f"model registry {source} is invalid ({len(lines)} problem{'s' if len(lines) != 1 else ''}):"
    return "\n".join([head, *lines])
