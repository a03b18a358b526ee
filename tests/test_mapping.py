"""The HF <-> mcore mapping engine (one `Mapper`): coverage, bit-exact round trips over parallel layouts, dense-layer
rows, stage placement from mcore's layer-offset helpers, encoder row names from the one TE decision."""

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
                           "hidden_size": 32, "num_experts": 4, "num_experts_per_tok": 2, "vocab_size": 16,
                           "intermediate_size": 12, "moe_intermediate_size": 8, "mlp_only_layers": [1]}}
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


def _text_config(layers: int) -> dict:
    return {"text_config": {"num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
                            "head_dim": 8, "hidden_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
                            "vocab_size": 16, "moe_intermediate_size": 8}}


@pytest.mark.parametrize("stages", ["uneven", "virtual"])
def test_stage_placement_follows_mcore(stages):
    """Uneven first stage and virtual pipeline stages: the layer -> (stage, chunk, local index) map is mcore's."""
    from omni_model.convert.mapping import layer_placement
    from omni_model.model.transformer_config import build_transformer_config

    cfg = _text_config(6 if stages == "uneven" else 4)
    layout = Layout(pp=2)
    extra = {"num_layers_in_first_pipeline_stage": 1} if stages == "uneven" else \
        {"virtual_pipeline_model_parallel_size": 2}
    tconfig = build_transformer_config(cfg, layout, perform_initialization=False, **extra)
    placement = layer_placement(tconfig)
    print(f"{stages}: {placement}")
    if stages == "uneven":
        assert placement == {0: (0, None, 0), 1: (1, None, 0), 2: (1, None, 1), 3: (1, None, 2), 4: (1, None, 3),
                             5: (1, None, 4)}
    else:  # chunk v of stage p holds layer v * pp + p
        assert placement == {0: (0, 0, 0), 1: (1, 0, 0), 2: (0, 1, 0), 3: (1, 1, 0)}
    m = Mapper(cfg, layout, rules=None, tconfig=tconfig)
    key = "thinker.model.layers.3.input_layernorm.weight"
    hf = {key: torch.ones(32)}
    owner = RankCoord(pp_rank=1, vp_stage=None if stages == "uneven" else 1)
    local = 2 if stages == "uneven" else 0
    assert m.hf_to_mcore_rank(hf.__getitem__, hf, owner) == {
        f"language_model.decoder.layers.{local}.input_layernorm.weight": hf[key]}
    assert m.hf_to_mcore_rank(hf.__getitem__, hf, RankCoord(pp_rank=0, vp_stage=owner.vp_stage)) == {}
    back = dict(m.iter_mcore_to_hf({owner: {f"language_model.decoder.layers.{local}.input_layernorm.weight": hf[key]}}))
    assert list(back) == [key]


def test_encoder_row_names_follow_use_te(reader):
    """The rows' LayerNorm names come from the same use_te the towers are built with."""
    local = {r.rule.mcore for r in Mapper(reader.config, Layout(), use_te=False).rows}
    te = {r.rule.mcore for r in Mapper(reader.config, Layout(), use_te=True).rows}
    assert "vision_model.decoder.layers.{i}.input_layernorm.weight" in local
    assert "vision_model.decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight" in te
    assert "audio_model.decoder.layers.{i}.mlp.linear_fc1.layer_norm_bias" in te
    assert not any("layer_norm_" in name for name in local)


def test_use_te_without_transformer_engine_is_refused(reader):
    """use_te=true where TE does not import is an error naming the config key, never a silent local fallback."""
    pytest.importorskip("torch")
    try:
        import transformer_engine  # noqa: F401

        pytest.skip("TransformerEngine is installed here")
    except ImportError:
        pass
    from omni_model.model.specs import require_te
    from omni_model.model.vision import VisionEncoder

    with pytest.raises(RuntimeError, match="model.use_te is true but TransformerEngine does not import"):
        require_te(True)
    with pytest.raises(RuntimeError, match="model.use_te"):
        VisionEncoder(reader.config, use_te=True)
    assert require_te(False) is False
