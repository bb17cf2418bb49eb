"""One declaration of every setting (EMBEDDER_* and RAG_CLEAN_*), one strict parser, each value's source,
and the checks made before a run writes anything (model sources, storage root). Issue 19 item 4,
issue 22 items 7, 8, 9."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from rag_clean.config.declaration import BY_ENV, BY_KEY, SETTINGS, markdown_table, run_settings
from rag_clean.config.paths import check_roots
from rag_clean.config.plan import PlanError, RetrievalConfig, build_run_plan
from rag_clean.config.registry import load_registry
from rag_clean.config.settings import (EmbedderSettings, SettingsError, process_provenance_lines, process_setting,
                                       resolve_settings)
from rag_clean.encoders import token_cache
from rag_clean.gpu.lease_settings import LeaseSettings

REPO = Path(__file__).resolve().parents[2]
CODE = [p for d in ("rag_clean", "rag_clean_assets", "resources") for p in (REPO / d).rglob("*.py")]
NAME = re.compile(r"\b((?:RAG_CLEAN|EMBEDDER)_[A-Z0-9_]*[A-Z0-9])\b")


# ---------------------------------------------------------------- one declaration


def test_no_module_reads_a_setting_from_the_environment_itself():
    """Every RAG_CLEAN_* / EMBEDDER_* value goes through rag_clean.config.settings (one parser, one default)."""
    direct = re.compile(r"(?:environ(?:\.get)?\s*[\[(]|getenv\s*\()\s*f?[\"'](?:RAG_CLEAN|EMBEDDER)_")
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in CODE
                 for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if direct.search(line)]
    assert offenders == []


def test_every_variable_the_code_names_is_declared():
    undeclared = {(m, p.relative_to(REPO).as_posix()) for p in CODE
                  for m in NAME.findall(p.read_text(encoding="utf-8")) if m not in BY_ENV}
    assert undeclared == set()


def test_the_settings_dataclass_and_the_retrieval_view_come_from_the_declaration():
    assert EmbedderSettings.keys() == [s.key for s in run_settings()]
    assert all(getattr(EmbedderSettings(), s.key) == s.default for s in run_settings())
    retrieval = RetrievalConfig()
    assert all(getattr(retrieval, f.name) == BY_KEY[f.name].default for f in dataclasses.fields(RetrievalConfig))


def test_readme_settings_table_is_the_generated_one():
    """`python -m rag_clean.config.settings --markdown` prints the table the README holds."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme
    assert all(f"`{s.env}`" in markdown_table() for s in SETTINGS)


# ---------------------------------------------------------------- one strict parser


@pytest.mark.parametrize("raw, expected", [("false", False), ("0", False), ("no", False), ("OFF", False),
                                           ("true", True), ("1", True), ("Yes", True), ("on", True)])
def test_token_cache_switch_takes_every_boolean_spelling(monkeypatch, raw, expected):
    monkeypatch.setenv("RAG_CLEAN_TOKEN_CACHE", raw)
    assert token_cache.enabled() is expected


@pytest.mark.parametrize("name, raw, message", [
    ("RAG_CLEAN_GIL_SWITCH_MS", "abc", "RAG_CLEAN_GIL_SWITCH_MS='abc': not a number"),
    ("RAG_CLEAN_TOKEN_CACHE", "nope", "RAG_CLEAN_TOKEN_CACHE='nope': not a boolean (true/false, 1/0, yes/no, on/off)"),
    ("RAG_CLEAN_GPU_POOL_LIMIT", "2.5", "RAG_CLEAN_GPU_POOL_LIMIT='2.5': not a whole number"),
    ("RAG_CLEAN_EXECUTOR", "multiprocesss", "RAG_CLEAN_EXECUTOR='multiprocesss': not one of 'in_process', "
                                            "'multiprocess', 'k8s'"),
    ("RAG_CLEAN_GPU_MEMORY_FRACTION", "1.5", "RAG_CLEAN_GPU_MEMORY_FRACTION='1.5': must be in (0.0, 1.0]"),
    ("EMBEDDER_RRF_K", "-1", "EMBEDDER_RRF_K='-1': must be > 0"),
])
def test_a_bad_value_is_one_line_naming_the_variable_and_the_value(name, raw, message):
    setting = BY_ENV[name]
    with pytest.raises(SettingsError) as err:
        if setting.scope == "process":
            process_setting(setting.key, {name: raw})
        else:
            resolve_settings(config_file=None, dotenv_file="/nonexistent/.env", environ={name: raw})
    assert str(err.value) == message


def test_force_cpu_has_one_parser(monkeypatch):
    """RAG_CLEAN_FORCE_CPU=on forced the CPU in the lease but not in the pool's GPU count (two parsers)."""
    assert LeaseSettings.from_env("/tmp/x", environ={"RAG_CLEAN_FORCE_CPU": "on"}).force_cpu is True
    with pytest.raises(SettingsError, match="RAG_CLEAN_FORCE_CPU='sure'"):
        LeaseSettings.from_env("/tmp/x", environ={"RAG_CLEAN_FORCE_CPU": "sure"})


def test_an_unset_or_empty_variable_is_the_default():
    assert process_setting("gil_switch_ms", {}) == 0.5
    assert process_setting("gil_switch_ms", {"RAG_CLEAN_GIL_SWITCH_MS": " "}) == 0.5
    assert process_setting("gpu_devices", {"RAG_CLEAN_GPU_DEVICES": "1, 0"}) == (1, 0)


def test_process_settings_carry_their_source_and_hide_secrets():
    lines = process_provenance_lines({"RAG_CLEAN_TOKEN_CACHE": "off", "RAG_CLEAN_QUERY_KEY": "s3cret", "OTHER": "x"})
    assert lines == ["RAG_CLEAN_TOKEN_CACHE=false (override via env)", "RAG_CLEAN_QUERY_KEY=<set> (override via env)"]


# ---------------------------------------------------------------- .env and config file typos


def _resolve(tmp_path, dotenv_text=None, config=None):
    dotenv = tmp_path / ".env"
    if dotenv_text is not None:
        dotenv.write_text(dotenv_text)
    path = None
    if config is not None:
        path = tmp_path / "c.toml"
        path.write_text(config)
    return resolve_settings(config_file=path, dotenv_file=dotenv, environ={})


@pytest.mark.parametrize("dotenv, message", [
    ("EMBEDDER_ENABLE_SPARS=0\n", r"unknown setting EMBEDDER_ENABLE_SPARS \(did you mean 'EMBEDDER_ENABLE_SPARSE'\?\)"),
    ("EMBEDER_ENABLE_SPARSE=0\n", r"unknown setting EMBEDER_ENABLE_SPARSE \(did you mean 'EMBEDDER_ENABLE_SPARSE'\?\)"),
    ("ENABLE_SPARSE=0\n", r"unknown setting ENABLE_SPARSE \(did you mean 'EMBEDDER_ENABLE_SPARSE'\?\)"),
    ("RAG_CLEAN_TOKEN_CACHE=0\n", r"RAG_CLEAN_TOKEN_CACHE is a process setting, read from the environment only"),
])
def test_a_misspelt_or_misplaced_dotenv_key_is_refused(tmp_path, dotenv, message):
    with pytest.raises(SettingsError, match=r"^\.env .*\.env: " + message):
        _resolve(tmp_path, dotenv)


def test_a_dotenv_file_may_hold_other_tools_variables(tmp_path):
    settings = _resolve(tmp_path, "HF_HOME=/models\nEMBEDDER_ENABLE_SPARSE=off\n")
    assert (settings.enable_sparse, settings.provenance["enable_sparse"]) == (False, ".env")


def test_a_misspelt_config_key_gets_the_same_hint(tmp_path):
    with pytest.raises(SettingsError, match=r"c\.toml: unknown setting 'enable_spars' \(did you mean 'enable_sparse'\?\)"):
        _resolve(tmp_path, config="enable_spars = false\n")
    with pytest.raises(SettingsError, match=r"'token_cache' is a process setting: set RAG_CLEAN_TOKEN_CACHE"):
        _resolve(tmp_path, config="token_cache = false\n")


# ---------------------------------------------------------------- checked before the first step writes


def test_a_dense_or_sparse_model_whose_source_is_missing_fails_the_plan(tiny_registry_path, tmp_path):
    registry = load_registry(tiny_registry_path)
    gone = tmp_path / "gone"
    models = tuple(dataclasses.replace(m, source=f"path:{gone}") if m.name in ("tiny-b", "tiny-splade") else m
                   for m in registry.models)
    broken = dataclasses.replace(registry, models=models)
    with pytest.raises(PlanError) as err:
        build_run_plan(broken, EmbedderSettings())
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("model tiny-b (dense): source 'path:") and str(gone) in lines[0]
    assert lines[1].startswith("model tiny-splade (sparse): ")
    # A disabled stage's model is not needed: sparse off, only the dense problem remains.
    with pytest.raises(PlanError, match=r"^model tiny-b \(dense\)[^\n]*$"):
        build_run_plan(broken, EmbedderSettings(enable_sparse=False))


def test_a_reranker_without_a_loadable_source_is_the_documented_fallback(tiny_registry_path):
    registry = load_registry(tiny_registry_path)
    models = tuple(dataclasses.replace(m, source="BAAI/not-in-any-cache") if m.role == "rerank" else m
                   for m in registry.models)
    plan = build_run_plan(dataclasses.replace(registry, models=models), EmbedderSettings())
    assert plan.rerank.source == "BAAI/not-in-any-cache"


def test_a_storage_root_inside_the_data_root_is_refused(tmp_path):
    data = tmp_path / "data"
    (data / "docs").mkdir(parents=True)
    check_roots(data, tmp_path / "storage")  # beside it: fine
    for storage, where in [(data / "docs" / "store", f"inside the collection folder {data / 'docs'}"),
                           (data, "the data root itself"), (data / "store", "a folder of the data root")]:
        with pytest.raises(SettingsError, match=re.escape(f"storage root {storage} is {where}")):
            check_roots(data, storage)
