"""The model registry file is validated as a whole: unknown keys/sections, wrong types, cross-field rules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rag_clean.config.registry import DEFAULT_REGISTRY_PATH, ModelSpec, Registry, RegistryError, load_registry

GOOD = """
[fusion]
method = "mean"

[[models]]
name = "a"
role = "dense"
source = "org/a"
dim = 32
weight = 1

[[models]]
name = "b"
role = "dense"
source = "org/b"
dim = 32
truncate_dim = 16
weight = 0.5
fallbacks = ["org/b2"]

[[models]]
name = "r"
role = "rerank"
source = "org/r"
max_length = 128
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    message = str(info.value)
    assert str(path) in message  # every message names the file
    return message


def test_good_file_builds_the_frozen_dataclasses(tmp_path):
    reg = load_registry(_write(tmp_path, GOOD))
    assert isinstance(reg, Registry) and reg.fusion_method == "mean"
    a, b, r = reg.models
    assert isinstance(a, ModelSpec) and a.weight == 1.0 and isinstance(a.weight, float)
    assert b.fallbacks == ("org/b2",) and b.output_dim == 16 and b.registry_dir == tmp_path
    assert reg.rerank == r and r.max_length == 128 and r.backend == "sentence-transformers"
    with pytest.raises(AttributeError):
        a.weight = 2.0  # type: ignore[misc]


def test_bundled_registry_loads():
    reg = load_registry(DEFAULT_REGISTRY_PATH)
    assert [m.role for m in reg.models] == ["dense", "dense", "sparse", "rerank"]
    assert reg.rerank is not None and reg.rerank.fallbacks


@pytest.mark.parametrize("edit, where, wanted", [
    (("method = \"mean\"", "methd = \"mean\""), "fusion.methd", "unknown key 'methd'; allowed: method"),
    (("[fusion]", "[fussion]"), "fussion", "unknown section 'fussion'; allowed: fusion, models"),
    (("fallbacks = [\"org/b2\"]", "fallback = [\"org/b2\"]"), "models[1].fallback", "unknown key 'fallback'; allowed: name, role"),
])
def test_unknown_keys_and_sections_fail_naming_where_and_what_is_allowed(tmp_path, edit, where, wanted):
    message = _error(tmp_path, GOOD.replace(*edit))
    assert f"{where}: {wanted}" in message


def test_model_instead_of_models_does_not_silently_drop_the_reranker(tmp_path):
    text = GOOD.replace("[[models]]\nname = \"r\"", "[[model]]\nname = \"r\"")
    message = _error(tmp_path, text)
    assert "model: unknown section 'model'; allowed: fusion, models" in message


def test_no_models_at_all(tmp_path):
    assert "names no [[models]]" in _error(tmp_path, "[fusion]\nmethod = \"concat\"\n")


@pytest.mark.parametrize("edit, line", [
    (("weight = 0.5", "weight = \"heavy\""), "models[1].weight: expected a number, got 'heavy'"),
    (("dim = 32\nweight = 1", "dim = \"32\"\nweight = 1"), "models[0].dim: expected an integer, got '32'"),
    (("max_length = 128", "max_length = 0"), "models[2].max_length: must be > 0, got 0"),
    (("fallbacks = [\"org/b2\"]", "fallbacks = \"x\""), "models[1].fallbacks: expected a list of strings, got 'x'"),
    (("fallbacks = [\"org/b2\"]", "fallbacks = [\"ok\", 3]"), "models[1].fallbacks[1]: expected a string, got 3"),
    (("weight = 1\n", "weight = true\n"), "models[0].weight: expected a number, got True"),
    (("weight = 0.5", "weight = 0.0"), "models[1].weight: must be > 0, got 0.0"),
    (("role = \"rerank\"", "role = \"ranker\""), "models[2].role: must be one of 'dense', 'sparse' or 'rerank', got 'ranker'"),
    (("max_length = 128", "dtype = \"fp8\""), "models[2].dtype: must be one of"),
    (("max_length = 128", "backend = \"onnx\""), "models[2].backend: must be one of"),
    (("method = \"mean\"", "method = \"max\""), "fusion.method: must be one of 'concat' or 'mean', got 'max'"),
    (("[fusion]\nmethod = \"mean\"", "fusion = \"mean\""), "fusion: expected a table, got 'mean'"),
    (("source = \"org/r\"\n", ""), "models[2].source: missing required key 'source'"),
    (("truncate_dim = 16", "truncate_dim = 64"), "models[1]: truncate_dim 64 > dim 32; vectors are never padded"),
    (("name = \"b\"", "name = \"A\""), "duplicate model names: models[0] and models[1] share the name 'a'"),
])
def test_wrong_types_and_values_name_the_key_and_what_was_expected(tmp_path, edit, line):
    text = GOOD.replace(*edit)
    assert text != GOOD
    path = _write(tmp_path, text)
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    assert f"{path}: {line}" in str(info.value)


def test_every_problem_is_reported_once_in_one_error(tmp_path):
    text = (GOOD.replace("weight = 0.5", "weight = \"heavy\"").replace("methd", "x")
            .replace("method = \"mean\"", "methd = \"mean\"").replace("max_length = 128", "max_length = 0"))
    message = _error(tmp_path, text)
    lines = message.splitlines()
    assert re.match(r"model registry .*models.toml is invalid \(3 problems\):", lines[0])
    assert sorted(line.split(": ", 1)[1].split(":")[0] for line in lines[1:]) == [
        "fusion.methd", "models[1].weight", "models[2].max_length"]


def test_colbert_only_on_bge_m3_dense_flagembedding(tmp_path):
    bad = GOOD.replace("name = \"a\"\nrole = \"dense\"", "name = \"a\"\nrole = \"dense\"\ncolbert = true")
    assert "models[0]: colbert = true needs role \"dense\", backend \"flagembedding\"" in _error(tmp_path, bad)
    ok = bad.replace("colbert = true", "colbert = true\nbackend = \"flagembedding\"\nflag_class = \"bge-m3\"")
    assert load_registry(_write(tmp_path, ok)).get("a").colbert is True
    assert "models[0].colbert: expected true or false, got 1" in _error(tmp_path, bad.replace("colbert = true", "colbert = 1"))


def test_invalid_toml_and_missing_file(tmp_path):
    assert "is not valid TOML" in _error(tmp_path, "[[models]\n")
    with pytest.raises(RegistryError, match="does not exist"):
        load_registry(tmp_path / "absent.toml")
