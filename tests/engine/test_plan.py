"""The run plan: one place decides which models and settings a run uses."""

from __future__ import annotations

import dataclasses

import pytest

from rag_clean.config.plan import PlanError, build_run_plan
from rag_clean.config.settings import EmbedderSettings, resolve_settings


def test_default_plan_runs_every_model_of_each_role(registry):
    plan = build_run_plan(registry, EmbedderSettings())
    assert [s.name for s in plan.dense] == [s.name for s in registry.dense]
    assert [s.name for s in plan.sparse] == [s.name for s in registry.sparse]
    assert plan.rerank == registry.rerank
    assert plan.fusion_method == registry.fusion_method
    assert plan.fusion_weights == {s.name: s.weight for s in registry.dense}
    assert all(plan.dense_disabled_reason(s) is None for s in registry.dense)
    assert plan.sparse_disabled_reason() is None and plan.exports_disabled_reason() is not None


def test_plan_selects_and_explains_what_does_not_run(registry):
    first, second = registry.dense[0], registry.dense[1]
    settings = EmbedderSettings(ensemble_models=(first.name,), enable_sparse=False, fusion_method="mean",
                                provenance={"ensemble_models": "override via env", "enable_sparse": "cli"})
    plan = build_run_plan(registry, settings)
    assert plan.dense == (first,) and plan.sparse == () and plan.fusion_method == "mean"
    assert plan.dense_disabled_reason(first) is None
    assert "not in ensemble_models" in plan.dense_disabled_reason(second)
    assert "(override via env)" in plan.dense_disabled_reason(second)
    assert plan.sparse_disabled_reason() == "sparse stage disabled: enable_sparse=false (cli)"


@pytest.mark.parametrize("key, names, message", [
    ("ensemble_models", ("no-such-model",), r"ensemble_models \(default\): \['no-such-model'\] are not dense models"),
    ("sparse_models", ("tiny-a",), r"sparse_models \(default\): \['tiny-a'\] are not sparse models"),
])
def test_plan_refuses_unknown_or_wrong_role_names(registry, key, names, message):
    with pytest.raises(PlanError, match=message):
        build_run_plan(registry, EmbedderSettings(**{key: names}))


def test_retrieval_sizes_come_from_the_settings(registry):
    plan = build_run_plan(registry, EmbedderSettings(top_k_candidates=7, rerank_top_k=3, rrf_k=5, rerank_batch_size=4,
                                                     enable_rerank=False))
    r = plan.retrieval
    assert (r.top_k_candidates, r.rerank_top_k, r.rrf_k, r.rerank_batch_size, r.enable_rerank) == (7, 3, 5, 4, False)


def test_retired_setting_is_reported_not_applied(tmp_path):
    config = tmp_path / "embedder.json"
    config.write_text('{"exclusive_ensemble": false, "enable_rerank": false}')
    settings = resolve_settings(config_file=config, dotenv_file=tmp_path / "none.env",
                                environ={"EMBEDDER_EXCLUSIVE_ENSEMBLE": "0"})
    assert settings.enable_rerank is False
    assert "exclusive_ensemble" not in settings.as_dict()
    assert len(settings.notes) == 2
    assert all(n.startswith("exclusive_ensemble is retired and ignored") for n in settings.notes)
    assert "by config file" in settings.notes[0] and "by override via env" in settings.notes[1]


def test_plan_is_immutable(registry):
    plan = build_run_plan(registry, EmbedderSettings())
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.fusion_method = "mean"
