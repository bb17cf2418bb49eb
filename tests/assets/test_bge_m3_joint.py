"""bge-m3 serving the dense and the sparse stage: one forward pass over the collection yields both.

A hand-written registry names the tiny bge-m3 twice: as a dense model and as a sparse model with the
same source ("joint partners"). The dense stage writes the lexical rows to a side file from its
forward pass; the sparse stage takes them from there without loading an encoder. ColBERT vectors come
from the same pass when the dense entry says `colbert = true`.
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

import rag_clean.encoders.factory as factory
import rag_clean.encoders.flag as flag
from rag_clean.config.registry import RegistryError, load_registry
from rag_clean.storage.layout import StorageLayout
from rag_clean.storage.arrow_io import read_arrow_table
from rag_clean.config.plan import build_run_plan
from rag_clean.config.settings import EmbedderSettings
from rag_clean.stages.joint import joint_outputs
from rag_clean_assets.assets.dense import dense_asset_key
from rag_clean_assets.assets.sparse import SPARSE_KEY, build_sparse_asset
from tiny_models import TINY_MAX_LENGTH

from pipeline_helpers import Pipeline, write_collection

DENSE = "tiny-bge-m3"
LEXICAL = "tiny-bge-m3-lexical"
DENSE_KEY = dg.AssetKey(["dense_embeddings", "tiny_bge_m3"])
CORE = dg.AssetSelection.assets("chunks", DENSE_KEY, SPARSE_KEY)


def write_registry(path: Path, models_dir: Path, *, colbert: bool = False, lexical_max_length: int = TINY_MAX_LENGTH,
                   with_splade: bool = False, with_rerank: bool = False) -> Path:
    source = json.dumps("path:" + str(models_dir / "tiny-bge-m3"))
    text = f"""
[[models]]
name = "{DENSE}"
role = "dense"
backend = "flagembedding"
flag_class = "bge-m3"
source = {source}
dim = 32
max_length = {TINY_MAX_LENGTH}
colbert = {"true" if colbert else "false"}

[[models]]
name = "{LEXICAL}"
role = "sparse"
backend = "flagembedding"
flag_class = "bge-m3"
source = {source}
max_length = {lexical_max_length}
top_k = 1000
"""
    if with_splade:
        text += f"""
[[models]]
name = "tiny-splade"
role = "sparse"
source = {json.dumps("path:" + str(models_dir / "tiny-splade"))}
max_length = {TINY_MAX_LENGTH}
top_k = 32
"""
    if with_rerank:
        text += f"""
[[models]]
name = "tiny-reranker"
role = "rerank"
source = {json.dumps("path:" + str(models_dir / "tiny-reranker"))}
max_length = {TINY_MAX_LENGTH}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def make_pipeline(tmp_path, tiny_models_dir, clean_settings):
    data_root = tmp_path / "data"
    write_collection(data_root)

    def make(name: str = "run", **registry_options) -> Pipeline:
        registry = write_registry(tmp_path / name / "models.toml", tiny_models_dir, **registry_options)
        return Pipeline(data_root, tmp_path / name / "storage", registry, tmp_path / "locks")

    return make


class M3Spy:
    """Counts bge-m3 model loads (by the role of the spec that loaded it) and transformer forward passes,
    and every call of the factory's load_sparse_encoder (the sparse stage's only way to an encoder)."""

    def __init__(self, monkeypatch):
        self.loads: list[tuple[str, str]] = []
        self.forwards = 0
        self.sparse_loads: list[str] = []
        original_init = flag.BGEM3Encoder.__init__
        real_load_sparse = factory.load_sparse_encoder

        def init(m3, spec, *args, **kwargs):
            original_init(m3, spec, *args, **kwargs)
            self.loads.append((spec.name, spec.role))
            m3.transformer.register_forward_hook(self._count)

        def load_sparse(spec, *args, **kwargs):
            self.sparse_loads.append(spec.name)
            return real_load_sparse(spec, *args, **kwargs)

        monkeypatch.setattr(flag.BGEM3Encoder, "__init__", init)
        monkeypatch.setattr(factory, "load_sparse_encoder", load_sparse)

    def _count(self, *_):
        self.forwards += 1


def materializations(result) -> dict[str, dict]:
    return {e.asset_key.to_user_string(): {k: v.value for k, v in e.materialization.metadata.items()}
            for e in result.get_asset_materialization_events()}


def chunk_table(pipeline: Pipeline) -> pa.Table:
    return read_arrow_table(pipeline.file("chunks", "demo.arrow"))


def sparse_rows(pipeline: Pipeline, model: str = LEXICAL) -> dict[str, dict[int, float]]:
    rows = pq.read_table(pipeline.file("sparse_vectors", "demo.parquet")).to_pylist()
    return {r["chunk_id"]: dict(zip(r["term_ids"], r["weights"])) for r in rows if r["model"] == model}


@pytest.fixture(scope="module")
def bgem3_reference(tiny_models_dir):
    """BGEM3FlagModel's own encode(): the independent reference for lexical weights and ColBERT vectors."""
    from FlagEmbedding import BGEM3FlagModel

    model = BGEM3FlagModel(str(tiny_models_dir / "tiny-bge-m3"), use_fp16=False, devices="cpu")

    def encode(texts: list[str]) -> dict:
        return model.encode(texts, max_length=TINY_MAX_LENGTH, return_dense=True, return_sparse=True,
                            return_colbert_vecs=True)

    return encode


def assert_rows_match_reference(pipeline: Pipeline, bgem3_reference) -> None:
    chunks = chunk_table(pipeline)
    ours = sparse_rows(pipeline)
    expected = bgem3_reference(chunks.column("text").to_pylist())["lexical_weights"]
    assert set(ours) == set(chunks.column("chunk_id").to_pylist())
    for chunk_id, reference in zip(chunks.column("chunk_id").to_pylist(), expected):
        assert ours[chunk_id], f"{chunk_id}: empty lexical row"
        assert ours[chunk_id] == pytest.approx({int(k): float(v) for k, v in reference.items()}, abs=1e-5), chunk_id


# ---------------------------------------------------------------------------------------------
# Registry convention and planning (no models loaded)
# ---------------------------------------------------------------------------------------------


def test_partners_need_same_bge_m3_source_and_length(tmp_path, tiny_models_dir):
    reg = load_registry(write_registry(tmp_path / "a.toml", tiny_models_dir, with_splade=True))
    dense, lexical, splade = reg.get(DENSE), reg.get(LEXICAL), reg.get("tiny-splade")
    assert reg.joint_sparse_partner(dense) == lexical
    assert reg.joint_dense_partner(lexical) == dense
    assert reg.joint_dense_partner(splade) is None
    # A different max_length truncates differently: not the same pass, so no partners.
    other = load_registry(write_registry(tmp_path / "b.toml", tiny_models_dir, lexical_max_length=32))
    assert other.joint_sparse_partner(other.get(DENSE)) is None
    assert other.joint_dense_partner(other.get(LEXICAL)) is None


def test_colbert_only_on_bge_m3_dense_entries(tmp_path, tiny_models_dir):
    path = write_registry(tmp_path / "models.toml", tiny_models_dir, with_splade=True)
    path.write_text(path.read_text().replace('top_k = 32', 'top_k = 32\ncolbert = true'))
    with pytest.raises(RegistryError, match=r"models\[2\]: colbert = true needs role \"dense\""):
        load_registry(path)


def test_plan_joint_outputs_follows_toggles(tmp_path, tiny_models_dir):
    reg = load_registry(write_registry(tmp_path / "models.toml", tiny_models_dir, with_splade=True))
    dense, root = reg.get(DENSE), tmp_path / "storage"
    layout = StorageLayout(root)

    def plan(registry=reg, spec=dense, **settings):
        run = build_run_plan(registry, EmbedderSettings(**settings))
        return joint_outputs(run.joint(spec), layout, spec, "demo")

    joint = plan(enable_sparse=True)
    assert joint.sparse_spec == reg.get(LEXICAL) and joint.colbert_path is None
    assert joint.sparse_path == root.resolve() / "sparse_vectors" / "_joint" / "tiny_bge_m3" / "demo.parquet"
    assert plan(enable_sparse=False) is None
    assert plan(enable_sparse=True, sparse_models=("tiny-splade",)) is None  # partner not selected
    with_colbert = load_registry(write_registry(tmp_path / "c.toml", tiny_models_dir, colbert=True))
    joint = plan(with_colbert, with_colbert.get(DENSE), enable_sparse=False)
    assert joint.sparse_path is None
    assert joint.colbert_path == root.resolve() / "colbert_vectors" / "tiny_bge_m3" / "demo.arrow"


def test_sparse_asset_depends_on_partner_dense_asset(tmp_path, tiny_models_dir):
    joint = build_sparse_asset(load_registry(write_registry(tmp_path / "a.toml", tiny_models_dir)))
    deps = {dep.asset_key for spec in joint.specs for dep in spec.deps}
    assert deps == {dg.AssetKey("chunks"), DENSE_KEY}
    plain = build_sparse_asset(load_registry(write_registry(tmp_path / "b.toml", tiny_models_dir, lexical_max_length=32)))
    assert {dep.asset_key for spec in plain.specs for dep in spec.deps} == {dg.AssetKey("chunks")}


# ---------------------------------------------------------------------------------------------
# Materialized
# ---------------------------------------------------------------------------------------------


def test_sparse_stage_takes_rows_from_the_dense_pass(make_pipeline, monkeypatch, bgem3_reference):
    pipeline = make_pipeline()
    spy = M3Spy(monkeypatch)
    result = pipeline.materialize(selection=CORE)
    assert result.success

    # One bge-m3 load for the whole run (the dense stage), one forward per batch it recorded;
    # the sparse stage never asked for an encoder.
    dense_record = pipeline.summary()["stages"]["dense_embeddings/tiny_bge_m3"]
    assert spy.loads == [(DENSE, "dense")]
    assert spy.forwards == dense_record["encode"]["batch_count"] > 0
    assert spy.sparse_loads == []

    meta = materializations(result)
    assert meta["sparse_vectors"]["shared_pass_with_dense"] == DENSE
    assert meta["sparse_vectors"]["fallback_used"] is False
    assert meta["dense_embeddings/tiny_bge_m3"]["joint_sparse_partner"] == LEXICAL
    summary = pipeline.summary()
    assert summary["sparse_run"]["shared_pass_with_dense"] == [DENSE]
    assert summary["sparse_run"]["status"] == "ok"
    assert summary["stages"]["sparse_vectors"]["shared_pass"][LEXICAL]["used"] is True

    side = pq.read_table(pipeline.file("sparse_vectors", "_joint", "tiny_bge_m3", "demo.parquet"))
    chunks = chunk_table(pipeline)
    assert side.schema.names == ["chunk_id", "content_hash", "term_ids", "weights"]
    assert sorted(side.column("content_hash").to_pylist()) == sorted(chunks.column("content_hash").to_pylist())
    assert b"fingerprint" in side.schema.metadata
    assert_rows_match_reference(pipeline, bgem3_reference)


def test_disabling_sparse_leaves_dense_alone_and_byte_identical(make_pipeline, monkeypatch):
    joint_run, dense_only = make_pipeline("joint"), make_pipeline("dense-only")
    assert joint_run.materialize(selection=CORE).success
    spy = M3Spy(monkeypatch)
    result = dense_only.materialize(selection=CORE, enable_sparse=False)
    assert result.success

    dense_file = ("dense_embeddings", "tiny_bge_m3", "demo.arrow")
    assert dense_only.file(*dense_file).read_bytes() == joint_run.file(*dense_file).read_bytes()
    assert not dense_only.file("sparse_vectors", "_joint").exists()
    assert not dense_only.file("sparse_vectors", "demo.parquet").exists()
    assert "joint" not in dense_only.summary()["stages"]["dense_embeddings/tiny_bge_m3"]
    assert "joint_sparse_partner" not in materializations(result)["dense_embeddings/tiny_bge_m3"]
    assert spy.loads == [(DENSE, "dense")]


def test_changed_chunk_recomputed_and_side_file_still_covers_every_chunk(make_pipeline, monkeypatch, bgem3_reference):
    pipeline = make_pipeline()
    assert pipeline.materialize(selection=CORE).success
    notes = pipeline.data_root / "demo" / "notes.jsonl"
    notes.write_text(json.dumps({"id": "note-1", "text": "restart the docker service after an upgrade"}) + "\n")

    spy = M3Spy(monkeypatch)
    result = pipeline.materialize(selection=CORE)
    assert result.success
    chunks = chunk_table(pipeline)
    joint = pipeline.summary()["stages"]["dense_embeddings/tiny_bge_m3"]["joint"]
    reuse = pipeline.summary()["stages"]["dense_embeddings/tiny_bge_m3"]["reuse"]
    assert reuse == {"reused": chunks.num_rows - 1, "computed": 1}
    assert joint["sparse_rows"] == chunks.num_rows and joint["sparse_rows_reused"] == chunks.num_rows - 1
    assert joint["extra_pass_rows"] == 0
    side = pq.read_table(pipeline.file("sparse_vectors", "_joint", "tiny_bge_m3", "demo.parquet"))
    assert sorted(side.column("chunk_id").to_pylist()) == sorted(chunks.column("chunk_id").to_pylist())
    assert sorted(side.column("content_hash").to_pylist()) == sorted(chunks.column("content_hash").to_pylist())
    assert spy.sparse_loads == [] and spy.loads == [(DENSE, "dense")]
    assert materializations(result)["sparse_vectors"]["shared_pass_with_dense"] == DENSE
    assert_rows_match_reference(pipeline, bgem3_reference)


def test_reused_dense_vectors_without_side_rows_rerun_only_for_lexical_rows(make_pipeline, monkeypatch, bgem3_reference):
    pipeline = make_pipeline()
    assert pipeline.materialize(selection=CORE, enable_sparse=False).success  # no side file yet
    dense_path = pipeline.file("dense_embeddings", "tiny_bge_m3", "demo.arrow")
    before = dense_path.read_bytes()

    spy = M3Spy(monkeypatch)
    assert pipeline.materialize(selection=CORE).success
    chunks = chunk_table(pipeline)
    record = pipeline.summary()["stages"]["dense_embeddings/tiny_bge_m3"]
    assert record["reuse"] == {"reused": chunks.num_rows, "computed": 0}
    assert record["joint"]["extra_pass_rows"] == chunks.num_rows
    assert dense_path.read_bytes() == before  # dense vectors reused as stored, not replaced by the new pass
    assert spy.sparse_loads == []
    assert pipeline.summary()["sparse_run"]["shared_pass_with_dense"] == [DENSE]
    assert_rows_match_reference(pipeline, bgem3_reference)


def test_side_file_missing_a_chunk_makes_sparse_encode_itself(make_pipeline, monkeypatch, bgem3_reference):
    pipeline = make_pipeline()
    assert pipeline.materialize(selection=CORE).success
    side_path = pipeline.file("sparse_vectors", "_joint", "tiny_bge_m3", "demo.parquet")
    side = pq.read_table(side_path)
    pq.write_table(side.slice(1), side_path)  # same fingerprint, one chunk short

    # With its own stored rows (same fingerprint), sparse_vectors reuses them: nothing is encoded again.
    spy = M3Spy(monkeypatch)
    result = pipeline.materialize(selection=dg.AssetSelection.assets(SPARSE_KEY))
    assert result.success and spy.sparse_loads == [] and spy.forwards == 0
    n = chunk_table(pipeline).num_rows
    assert pipeline.summary()["stages"]["sparse_vectors"]["reuse_counts"][LEXICAL] == {
        "unit": "chunks", "reused": n, "computed": 0}
    assert_rows_match_reference(pipeline, bgem3_reference)

    pipeline.file("sparse_vectors", "demo.parquet").unlink()  # without them, it encodes itself
    spy = M3Spy(monkeypatch)
    result = pipeline.materialize(selection=dg.AssetSelection.assets(SPARSE_KEY))
    assert result.success
    assert spy.sparse_loads == [LEXICAL] and spy.loads == [(LEXICAL, "sparse")] and spy.forwards > 0
    stage = pipeline.summary()["stages"]["sparse_vectors"]
    assert stage["shared_pass_with_dense"] == []
    reason = stage["shared_pass"][LEXICAL]["reason"]
    assert f"lacks 1 of {chunk_table(pipeline).num_rows} chunks" in reason and str(side_path) in reason
    assert materializations(result)["sparse_vectors"]["shared_pass_with_dense"] == ""
    assert_rows_match_reference(pipeline, bgem3_reference)


def test_colbert_vectors_from_the_same_pass_when_asked(make_pipeline, monkeypatch, bgem3_reference):
    pipeline = make_pipeline(colbert=True)
    spy = M3Spy(monkeypatch)
    result = pipeline.materialize(selection=CORE)
    assert result.success
    assert spy.loads == [(DENSE, "dense")] and spy.sparse_loads == []

    path = pipeline.file("colbert_vectors", "tiny_bge_m3", "demo.arrow")
    assert path == StorageLayout(pipeline.storage_root).colbert_file(DENSE_KEY.path[-1], "demo")
    table = ipc.open_file(pa.memory_map(str(path))).read_all()
    assert table.schema.field("token_vectors").type == pa.list_(pa.list_(pa.float32(), 32))
    chunks = chunk_table(pipeline)
    assert sorted(table.column("chunk_id").to_pylist()) == sorted(chunks.column("chunk_id").to_pylist())
    expected = dict(zip(chunks.column("chunk_id").to_pylist(),
                        bgem3_reference(chunks.column("text").to_pylist())["colbert_vecs"]))
    for chunk_id, vectors in zip(table.column("chunk_id").to_pylist(), table.column("token_vectors").to_pylist()):
        ours = np.asarray(vectors, dtype=np.float32)
        assert ours.shape == expected[chunk_id].shape and ours.shape[0] > 0, chunk_id
        np.testing.assert_allclose(ours, expected[chunk_id], atol=1e-5)
    assert materializations(result)["dense_embeddings/tiny_bge_m3"]["colbert_rows"] == chunks.num_rows
    assert materializations(result)["sparse_vectors"]["shared_pass_with_dense"] == DENSE


def test_whole_graph_with_bge_m3_partners(make_pipeline):
    pipeline = make_pipeline(with_rerank=True)
    result = pipeline.materialize()
    assert result.success
    order = [e.asset_key for e in result.get_asset_materialization_events()]
    assert order.index(DENSE_KEY) < order.index(SPARSE_KEY)
    checks = result.get_asset_check_evaluations()
    failed = [(c.asset_key.to_user_string(), c.check_name, c.severity) for c in checks if not c.passed]
    # Too few planted queries to tune the hybrid weights: the one honest WARN of this run (issue 21).
    assert checks and failed == [("reranked", "hybrid_weights_tuned", dg.AssetCheckSeverity.WARN)], failed
    summary = pipeline.summary()
    assert summary["sparse_run"]["shared_pass_with_dense"] == [DENSE]
    assert f"sparse:{LEXICAL}" in summary["stages"]["reranked"]["candidate_sources"]
    assert StorageLayout(pipeline.storage_root).joint_sparse_file(DENSE_KEY.path[-1], "demo").exists()
    assert dense_asset_key(load_registry(pipeline.registry_path).get(DENSE)) == DENSE_KEY
