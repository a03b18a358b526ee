"""The HF <-> mcore mapping table: coverage, bit-exact round trips over parallel layouts, dense-layer rows."""

from __future__ import annotations

import pytest
import torch

from omni_model.convert.mapping import (
    Mapper,
    RankCoord,
    SafetensorsReader,
    all_coords,
)
from omni_model.model.transformer_config import Layout


@pytest.fixture(scope="module")
def reader(tiny_hf_dir):
    return SafetensorsReader(tiny_hf_dir)


def test_every_thinker_tensor_has_a_row(reader):
    m = Mapper(reader.config, Layout())
    missing = m.unmapped_hf_keys(reader.keys(), prefixes=("thinker.model.", "thinker.lm_head."))
    assert not missing, missing[:10]
    missing = m.unmapped_hf_keys(reader.keys(), prefixes=("thinker.",))
    assert not missing, missing[:10]


LAYOUTS = [
    Layout(),
    Layout(tp=2),
    Layout(ep=2),
    Layout(tp=2, ep=2),
    Layout(tp=2, pp=2, ep=4, etp=2),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"tp{l.tp}pp{l.pp}ep{l.ep}etp{l.etp}")
def test_roundtrip_bit_exact(reader, layout):
    m = Mapper(reader.config, layout)
    keys = [k for k in reader.keys() if k.startswith("thinker.")]
    shards = {c: m.hf_to_mcore_rank(reader.get, keys, c) for c in all_coords(layout)}
    back = dict(m.iter_mcore_to_hf(shards))
    mapped = [k for k in keys if k in back]
    llm = [k for k in keys if k.startswith(("thinker.model.", "thinker.lm_head."))]
    assert set(llm) <= set(mapped)
    assert set(back) == set(mapped)
    for k in mapped:
        a, b = reader.get(k), back[k]
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), k


def test_rank_shapes_and_expert_placement(reader):
    layout = Layout(tp=2, pp=2, ep=4, etp=2)
    m = Mapper(reader.config, layout)
    sd = m.hf_to_mcore_rank(reader.get, reader.keys(), RankCoord(tp_rank=1, pp_rank=1, ep_rank=3, etp_rank=0))
    # 4 layers / pp2 -> stage 1 holds global layers 2,3 as local 0,1; 8 experts / ep4 -> local 0,1 = global 6,7
    assert "language_model.decoder.layers.1.mlp.experts.linear_fc1.weight1" in sd
    assert "language_model.decoder.layers.2.input_layernorm.weight" not in sd
    assert "language_model.output_layer.weight" in sd and "language_model.embedding.word_embeddings.weight" not in sd
    fc1 = sd["language_model.decoder.layers.1.mlp.experts.linear_fc1.weight1"]
    gate = reader.get("thinker.model.layers.3.mlp.experts.7.gate_proj.weight")
    up = reader.get("thinker.model.layers.3.mlp.experts.7.up_proj.weight")
    assert torch.equal(fc1, torch.cat([gate[:16], up[:16]]))  # etp rank 0: first halves of gate and up
    qkv = sd["language_model.decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape == (64, 64)  # (4 q + 2 k + 2 v heads) * 16 / tp2
    # tp rank 1 holds query group 1: q heads 2,3, k head 1, v head 1
    q = reader.get("thinker.model.layers.2.self_attn.q_proj.weight")
    k = reader.get("thinker.model.layers.2.self_attn.k_proj.weight")
    v = reader.get("thinker.model.layers.2.self_attn.v_proj.weight")
    assert torch.equal(qkv, torch.cat([q[32:64], k[16:32], v[16:32]]))
    assert sd["language_model.decoder.layers.0.self_attention.linear_proj.weight"].shape == (64, 32)


def test_dense_layer_rows_roundtrip():
    """mlp_only_layers rows (gate/up fuse on a dense MLP) on synthetic tensors, TP2."""
    cfg = {"text_config": {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                           "hidden_size": 32, "num_experts": 4, "vocab_size": 16}}
    g = torch.Generator().manual_seed(0)
    hf = {
        "thinker.model.layers.1.mlp.gate_proj.weight": torch.randn(12, 32, generator=g),
        "thinker.model.layers.1.mlp.up_proj.weight": torch.randn(12, 32, generator=g),
        "thinker.model.layers.1.mlp.down_proj.weight": torch.randn(32, 12, generator=g),
    }
    layout = Layout(tp=2)
    m = Mapper(cfg, layout)
    shards = {c: m.hf_to_mcore_rank(hf.__getitem__, hf, c) for c in all_coords(layout)}
    assert shards[RankCoord(tp_rank=1)]["language_model.decoder.layers.1.mlp.linear_fc1.weight"].shape == (12, 32)
    back = dict(m.iter_mcore_to_hf(shards))
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_mapper_replicates_the_audio_rows_where_the_audio_tower_is_replicated():
    from omni_model.configs import released_30b_a3b_config

    config = released_30b_a3b_config()  # 20 audio heads: split at TP=4, replicated at TP=8
    split = [r.rule for r in Mapper(config, Layout(tp=4)).rows if r.rule.mcore.startswith("audio_model.decoder.")]
    replicated = [r.rule for r in Mapper(config, Layout(tp=8)).rows if r.rule.mcore.startswith("audio_model.decoder.")]
    assert split and any(rule.tp_dim is not None for rule in split)
    assert replicated and all(rule.tp_dim is None for rule in replicated)
