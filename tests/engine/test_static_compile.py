"""FastBert's static-shape compile (setting `compile`, RAG_CLEAN_COMPILE): the token-bucket ladder, padding
that never touches the real rows, outputs equal to the eager forward, and compiles bounded by the ladder.
The compiling tests run inductor on the CPU (gcc) on tiny models with few buckets: ~20 s in all."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rag_clean.config.settings import SettingsError
from rag_clean.encoders.fast_bert import FastBert
from rag_clean.encoders.static_shapes import bucket_for, bucket_ladder, pad_to_bucket


def _tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, pad_token_id=0)
    return BertModel(cfg).eval()


def _batch(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(3, 50, (n,), generator=g) for n in lengths])
    within = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    return ids, within, torch.zeros_like(ids), cu, max(lengths)


def _worst_cos(a, b):
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min().item()


def test_ladder_is_the_budget_halved_and_aligned_and_buckets_round_up():
    assert bucket_ladder(8192) == (256, 512, 1024, 2048, 4096, 8192)
    assert bucket_ladder(131072)[0] == 4096 and len(bucket_ladder(131072)) == 6
    assert bucket_ladder(100_000) == (3136, 6272, 12544, 25024, 50048, 100032)  # multiples of 64, top covers it
    assert bucket_ladder(96) == (128,)
    ladder = bucket_ladder(8192)
    assert [bucket_for(n, ladder) for n in (1, 256, 257, 8000, 8192)] == [256, 256, 512, 8192, 8192]
    assert bucket_for(8193, ladder) == 16384 and bucket_for(300, None) == 512 and bucket_for(3, None) == 256


def test_padding_rows_never_reach_the_real_rows():
    model = _tiny_bert()
    fast = FastBert(model, model.config)  # eager: only the padding is under test here
    lengths = [7, 3, 12, 1, 9]
    ids, within, types, cu, longest = _batch(lengths, seed=1)
    n = int(cu[-1])
    with torch.inference_mode():
        want = fast(ids, within, types, cu, longest)
        p_ids, p_pos, p_types, p_cu, p_longest = pad_to_bucket(ids, within, types, cu, longest, 64)
        # Dummy rows after the real ones, none longer than the batch's longest row.
        assert p_ids.shape[0] == 64 and p_cu[:len(cu)].equal(cu) and int(p_cu[-1]) == 64 and p_longest == longest
        assert (p_cu[len(cu):] - p_cu[len(cu) - 1:-1]).max().item() <= longest
        got = fast._forward(p_ids, p_pos, p_types, p_cu, p_longest)
        # Other pad ids change the pad rows, never the real ones (they would if pads joined the last row).
        p_ids[n:] = torch.randint(3, 50, (64 - n,), generator=torch.Generator().manual_seed(2))
        other = fast._forward(p_ids, p_pos, p_types, p_cu, p_longest)
    assert torch.allclose(got[:n], want, atol=1e-5)
    assert torch.allclose(other[:n], want, atol=1e-5)
    assert not torch.allclose(other[n:], got[n:], atol=1e-3)


def test_static_compile_equals_eager_and_compiles_once_per_bucket():
    from torch._dynamo.utils import counters

    model = _tiny_bert()
    eager = FastBert(model, model.config)
    torch._dynamo.reset()
    static = FastBert(model, model.config, compile="static", bucket_top=256)
    assert static.ladder == (64, 128, 256)
    batches = [_batch(lengths, seed) for seed, lengths in enumerate(
        [[5, 9, 3], [30, 20, 12, 1], [40, 33, 20], [17], [50, 45, 30, 20, 10]])]  # 17, 63, 93, 17, 155 tokens
    before = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for b in batches:
            want, got = eager(*b), static(*b)
            assert got.shape == want.shape
            assert _worst_cos(got, want) >= 0.999 and torch.allclose(got, want, atol=1e-4)
        compiled = counters["stats"]["unique_graphs"] - before
        assert static.buckets_used == {64, 128, 256}
        assert compiled == 2 * len(static.buckets_used)  # post-attention and FFN, once per bucket
        for b in batches:  # every shape seen: nothing compiles again
            static(*b)
    assert counters["stats"]["unique_graphs"] - before == compiled


def test_setting_turns_static_compile_on_through_the_encoder(registry, monkeypatch):
    from rag_clean.encoders.st_dense import STDenseEncoder

    from test_encoders import TEXTS

    spec = registry.get("tiny-b")
    monkeypatch.delenv("RAG_CLEAN_COMPILE", raising=False)
    off = STDenseEncoder(spec, token_budget=96)
    assert off.fast_options["compile"] == "off" and off.replicas[0].fast.compile == "off"  # the default
    monkeypatch.setenv("RAG_CLEAN_COMPILE", "static")
    on = STDenseEncoder(spec, token_budget=96)
    fast = on.replicas[0].fast
    assert fast.compile == "static" and fast.ladder == bucket_ladder(96) == (128,)  # anchored at the budget
    want, got = off.encode_all(TEXTS), on.encode_all(TEXTS)
    assert (want * got).sum(1).min() >= 0.999 and np.allclose(got, want, atol=1e-4)
    assert fast.buckets_used == {128}
    off.close()
    on.close()


def test_a_bad_compile_value_is_one_line_naming_the_variable(registry, monkeypatch):
    from rag_clean.encoders.st_dense import STDenseEncoder

    monkeypatch.setenv("RAG_CLEAN_COMPILE", "dynamic")
    with pytest.raises(SettingsError) as err:
        STDenseEncoder(registry.get("tiny-a"))
    message = str(err.value)
    assert "RAG_CLEAN_COMPILE" in message and "'dynamic'" in message and "static" in message
    assert "\n" not in message
