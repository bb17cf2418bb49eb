"""Settings: precedence defaults < config file < .env < env < overrides, each value's source recorded."""

from __future__ import annotations

import json

import pytest

from rag_clean.config.settings import EmbedderSettings, SettingsError, resolve_settings


@pytest.fixture
def files(tmp_path):
    config = tmp_path / "embedder.json"
    config.write_text(json.dumps({"enable_sparse": False, "rerank_top_k": 7, "fusion_method": "mean",
                                  "top_k_candidates": 50}))
    dotenv = tmp_path / ".env"
    dotenv.write_text("EMBEDDER_RERANK_TOP_K=9\nEMBEDDER_TOP_K_CANDIDATES=60\nEMBEDDER_ENABLE_RERANK=0\n")
    return config, dotenv


def test_defaults_when_nothing_is_set(tmp_path):
    s = resolve_settings(config_file=None, dotenv_file=tmp_path / "none.env",
                         environ={"EMBEDDER_CONFIG_FILE": str(tmp_path / "absent.json")})
    assert s == EmbedderSettings()
    assert set(s.provenance.values()) == {"default"}
    assert set(s.provenance) == set(EmbedderSettings.keys())


def test_each_layer_overrides_the_one_below(files):
    config, dotenv = files
    environ = {"EMBEDDER_TOP_K_CANDIDATES": "70", "EMBEDDER_SPARSE_MODELS": "a, b,", "EMBEDDER_RRF_K": ""}
    s = resolve_settings(config_file=config, dotenv_file=dotenv, environ=environ,
                         overrides={"top_k_candidates": 80, "enable_rerank": None}, override_source="run config")
    assert (s.enable_sparse, s.provenance["enable_sparse"]) == (False, "config file")
    assert (s.fusion_method, s.provenance["fusion_method"]) == ("mean", "config file")
    assert (s.rerank_top_k, s.provenance["rerank_top_k"]) == (9, ".env")
    assert (s.enable_rerank, s.provenance["enable_rerank"]) == (False, ".env")  # None override is ignored
    assert (s.sparse_models, s.provenance["sparse_models"]) == (("a", "b"), "override via env")
    assert (s.top_k_candidates, s.provenance["top_k_candidates"]) == (80, "run config")
    # An empty env value means "unset", not "empty string".
    assert (s.rrf_k, s.provenance["rrf_k"]) == (60, "default")
    assert "top_k_candidates=80 (run config)" in s.provenance_lines()


def test_env_beats_config_and_dotenv(files):
    config, dotenv = files
    s = resolve_settings(config_file=config, dotenv_file=dotenv,
                         environ={"EMBEDDER_ENABLE_SPARSE": "yes", "EMBEDDER_RERANK_TOP_K": "3"})
    assert (s.enable_sparse, s.provenance["enable_sparse"]) == (True, "override via env")
    assert (s.rerank_top_k, s.provenance["rerank_top_k"]) == (3, "override via env")
    assert (s.top_k_candidates, s.provenance["top_k_candidates"]) == (60, ".env")


def test_config_file_from_env_var_and_toml_section(tmp_path):
    config = tmp_path / "embedder.toml"
    config.write_text("[embedder]\nenable_rerank = false\nquery_text_mode = \"truncate\"\n")
    s = resolve_settings(dotenv_file=tmp_path / "none.env", environ={"EMBEDDER_CONFIG_FILE": str(config)})
    assert (s.enable_rerank, s.query_text_mode) == (False, "truncate")
    assert s.provenance["query_text_mode"] == "config file"


@pytest.mark.parametrize("raw", ["maybe", "2", "tru"])
def test_bad_bool_in_env_names_source_and_key(tmp_path, raw):
    with pytest.raises(SettingsError, match=rf"^EMBEDDER_ENABLE_SPARSE='{raw}': not a boolean"):
        resolve_settings(dotenv_file=tmp_path / "none.env",
                         environ={"EMBEDDER_CONFIG_FILE": str(tmp_path / "x.json"), "EMBEDDER_ENABLE_SPARSE": raw})


def test_bad_values_in_config_file_name_source_and_key(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"enable_rerank": "perhaps"}))
    with pytest.raises(SettingsError, match=r"^config file .*c\.json: enable_rerank='perhaps': not a boolean"):
        resolve_settings(config_file=config, dotenv_file=tmp_path / "none.env", environ={})
    config.write_text(json.dumps({"rerank_top_k": 0}))
    with pytest.raises(SettingsError, match=r"c\.json: rerank_top_k=0: must be > 0"):
        resolve_settings(config_file=config, dotenv_file=tmp_path / "none.env", environ={})
    config.write_text(json.dumps({"no_such_key": 1}))
    with pytest.raises(SettingsError, match=r"c\.json: unknown setting 'no_such_key'"):
        resolve_settings(config_file=config, dotenv_file=tmp_path / "none.env", environ={})


def test_bad_dotenv_and_override_name_their_source(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("EMBEDDER_FUSION_METHOD=median\n")
    with pytest.raises(SettingsError, match=r"^\.env .*\.env: EMBEDDER_FUSION_METHOD='median': not one of 'concat', 'mean'"):
        resolve_settings(dotenv_file=dotenv, environ={"EMBEDDER_CONFIG_FILE": str(tmp_path / "x.json")})
    with pytest.raises(SettingsError, match=r"^run config: query_text_mode='raw': not one of 'hash', 'truncate'"):
        resolve_settings(dotenv_file=tmp_path / "none.env", environ={"EMBEDDER_CONFIG_FILE": str(tmp_path / "x.json")},
                         overrides={"query_text_mode": "raw"})


def test_missing_or_invalid_config_file_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        resolve_settings(config_file=tmp_path / "nope.json", environ={})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SettingsError, match=r"bad.json is not valid JSON"):
        resolve_settings(config_file=bad, dotenv_file=tmp_path / "none.env", environ={})
