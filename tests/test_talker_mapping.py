"""The talker through the one Mapper (TALKER_RULES): every `talker.*` tensor has a row, HF -> mcore (every rank of a
parallel layout) -> HF is bit-exact, shards land where the talker's TP/EP layout puts them, and pipeline parallelism
is refused with a reason."""

from __future__ import annotations

import pytest
import torch

from omni_model.convert.mapping import RankCoord, SafetensorsReader, all_coords, talker_mapper
from omni_model.model.transformer_config import Layout


@pytest.fixture(scope="module")
def reader(tiny_hf_dir):
    return SafetensorsReader(tiny_hf_dir)


def test_every_talker_tensor_has_a_row(reader):
    talker_keys = [k for k in reader.keys() if k.startswith("talker.")]
    assert len(talker_keys) > 100
    assert talker_mapper(reader.config).unmapped_hf_keys(reader.keys(), prefixes=("talker.",)) == []


LAYOUTS = [Layout(), Layout(tp=2), Layout(ep=2), Layout(tp=2, ep=2), Layout(tp=2, ep=4, etp=2)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"tp{l.tp}ep{l.ep}etp{l.etp}")
def test_talker_roundtrip_bit_exact(reader, layout):
    mapper = talker_mapper(reader.config, layout)
    keys = [k for k in reader.keys() if k.startswith("talker.")]
    shards = {c: mapper.hf_to_mcore_rank(reader.get, keys, c) for c in all_coords(layout)}
    back = dict(mapper.iter_mcore_to_hf(shards))
    assert set(back) == set(keys)
    for key in keys:
        a, b = reader.get(key), back[key]
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), key


def test_talker_shards_follow_the_layout(reader):
    """TP2 x EP2 x ETP2 (4 experts: 2 per EP rank): rank (tp 1, ep 1, etp 0) holds global expert 3 as local 1 with the
    first halves of its gate and up rows, the second query group of the decoder's and the predictor's attention, the
    second vocab half of the codec head and of every predictor head, the shared expert's second column block."""
    layout = Layout(tp=2, ep=2, etp=2)
    sd = talker_mapper(reader.config, layout).hf_to_mcore_rank(
        reader.get, reader.keys(), RankCoord(tp_rank=1, ep_rank=1, etp_rank=0))
    layer = "talker.language_model.decoder.layers.1."
    fc1 = sd[layer + "mlp.experts.linear_fc1.weight1"]
    gate = reader.get("talker.model.layers.1.mlp.experts.3.gate_proj.weight")
    up = reader.get("talker.model.layers.1.mlp.experts.3.up_proj.weight")
    half = gate.shape[0] // 2
    assert torch.equal(fc1, torch.cat([gate[:half], up[:half]]))
    assert layer + "mlp.experts.linear_fc1.weight2" not in sd
    q = reader.get("talker.model.layers.1.self_attn.q_proj.weight")  # 4 heads x 16, 2 KV heads: group 1 = heads 2,3
    k = reader.get("talker.model.layers.1.self_attn.k_proj.weight")
    v = reader.get("talker.model.layers.1.self_attn.v_proj.weight")
    assert torch.equal(sd[layer + "self_attention.linear_qkv.weight"], torch.cat([q[32:], k[16:], v[16:]]))
    shared_gate = reader.get("talker.model.layers.1.mlp.shared_expert.gate_proj.weight")
    shared_up = reader.get("talker.model.layers.1.mlp.shared_expert.up_proj.weight")
    n = shared_gate.shape[0] // 2
    assert torch.equal(sd[layer + "mlp.shared_experts.linear_fc1.weight"], torch.cat([shared_gate[n:], shared_up[n:]]))
    assert torch.equal(sd[layer + "mlp.shared_experts.gate_weight"],
                       reader.get("talker.model.layers.1.mlp.shared_expert_gate.weight"))
    assert torch.equal(sd["talker.language_model.output_layer.weight"], reader.get("talker.codec_head.weight")[1536:])
    assert torch.equal(sd["talker.code_predictor.heads.14.weight"],
                       reader.get("talker.code_predictor.lm_head.14.weight")[1024:])
    assert torch.equal(sd["talker.code_predictor.embeddings.3.weight"],
                       reader.get("talker.code_predictor.model.codec_embedding.3.weight")[1024:])
    fc2 = reader.get("talker.text_projection.linear_fc2.weight")
    assert torch.equal(sd["talker.text_projection.linear_fc2.weight"], fc2[:, fc2.shape[1] // 2:])
    assert torch.equal(sd["talker.text_projection.linear_fc2.bias"], reader.get("talker.text_projection.linear_fc2.bias"))


def test_talker_refuses_pipeline_parallelism(reader):
    with pytest.raises(ValueError, match="talker runs without pipeline parallelism"):
        talker_mapper(reader.config, Layout(pp=2))
