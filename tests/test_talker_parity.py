"""The mcore talker (local spec, fp32, CPU) against transformers' `Qwen3OmniMoeTalkerForConditionalGeneration` on the
tiny checkpoint with sharpened talker weights (llm_helpers.sharpened_checkpoint: logits of magnitude ~7 that depend
on the input): the input assembly (projections + codec embeddings), the first code group's logits (MoE decoder with
shared experts, interleaved MRoPE), and groups 1..15 from the code predictor, called step by step as `generate` calls
it. Gate: max |ours - transformers| <= 1e-5 x max |transformers| (measured ~1e-7 .. 1e-6). A 1 % change of any one of
several weights fails the gate (sensitivity)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from llm_helpers import config_of, relative_error, sharpened_checkpoint
from talker_helpers import (hf_inputs_embeds, hf_residual_logits, hf_talker, hf_talker_outputs, talker_batch)

warnings.filterwarnings("ignore")

TOLERANCE = 1e-5  # of max |reference logit|


@pytest.fixture(scope="module")
def sharp_dir(tiny_hf_dir, tmp_path_factory):
    return sharpened_checkpoint(tiny_hf_dir, tmp_path_factory.mktemp("sharp_talker") / "hf", parts=("talker.",))


@pytest.fixture(scope="module")
def models(sharp_dir):
    from omni_model.convert.mapping import load_hf_into_talker
    from omni_model.model.talker import build_talker
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    talker = build_talker(config_of(sharp_dir), dtype=torch.float32, use_te=False)
    load_hf_into_talker(talker, sharp_dir)
    return talker.eval(), hf_talker(sharp_dir)


def _ours(talker, batch, **kw):
    with torch.no_grad():
        embeds = talker.inputs_embeds(batch.thinker_embeds, batch.codec_codes, batch.multimodal_mask,
                                      batch.thinker_hidden)
        return embeds, talker(embeds, batch.position_ids, frame_positions=batch.frame_positions,
                              frame_codes=batch.frame_codes, **kw)


def _reference(ref, batch):
    with torch.no_grad():
        embeds = hf_inputs_embeds(ref, batch)
        logits, hidden = hf_talker_outputs(ref, embeds, batch.position_ids)
        rows = hidden.reshape(-1, hidden.shape[-1])[batch.frame_positions]
        return embeds, logits, hf_residual_logits(ref, rows, batch.frame_codes)


def _errors(talker, ref, batch):
    ours_in, out = _ours(talker, batch)
    ref_in, ref_first, ref_residual = _reference(ref, batch)
    return {"inputs": relative_error(ours_in, ref_in), "first": relative_error(out.first, ref_first),
            "residual": relative_error(out.residual, ref_residual)}, (ref_first, ref_residual)


def test_talker_matches_transformers(models, sharp_dir):
    talker, ref = models
    batch = talker_batch(config_of(sharp_dir))
    errors, (first, residual) = _errors(talker, ref, batch)
    print(f"talker parity (max abs err / max |ref|): {errors}; max |ref| first {first.abs().max():.2f}, "
          f"residual {residual.abs().max():.2f}")
    assert first.abs().max() > 3 and first.std() > 1 and residual.std() > 1  # sharpened: input-dependent logits
    assert residual.shape == (15, batch.frame_codes.shape[0], 2048)
    assert all(err <= TOLERANCE for err in errors.values()), errors


def test_packed_thd_rows_equal_separate_sequences(models, sharp_dir):
    """Two sequences of different lengths packed into one THD row (cu_seqlens) give each its own first-group and
    code-predictor logits (transformers run on each sequence alone)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    talker, ref = models
    cfg = config_of(sharp_dir)
    parts = [talker_batch(cfg, b=1, s=16, seed=3), talker_batch(cfg, b=1, s=12, seed=4, frames_from=8)]
    lengths = [p.position_ids.shape[-1] for p in parts]
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                          max_seqlen_kv=max(lengths))
    packed = dataclasses.replace(
        parts[0],
        thinker_embeds=torch.cat([p.thinker_embeds for p in parts], 1),
        multimodal_mask=torch.cat([p.multimodal_mask for p in parts], 1),
        thinker_hidden=torch.cat([p.thinker_hidden for p in parts]),
        codec_codes=torch.cat([p.codec_codes for p in parts], 1),
        position_ids=torch.cat([p.position_ids for p in parts], 2),
        frame_positions=torch.cat([parts[0].frame_positions, parts[1].frame_positions + lengths[0]]),
        frame_codes=torch.cat([p.frame_codes for p in parts]))
    _, out = _ours(talker, packed, packed_seq_params=psp)
    refs = [_reference(ref, p) for p in parts]
    first_err = max(relative_error(out.first[:, :lengths[0]], refs[0][1]),
                    relative_error(out.first[:, lengths[0]:], refs[1][1]))
    n0 = parts[0].frame_codes.shape[0]
    residual_err = max(relative_error(out.residual[:, :n0], refs[0][2]), relative_error(out.residual[:, n0:], refs[1][2]))
    print(f"packed vs separate: first {first_err:.2e}, residual {residual_err:.2e}")
    assert first_err <= TOLERANCE and residual_err <= TOLERANCE


SENSITIVE = [
    "language_model.decoder.layers.0.mlp.shared_experts.linear_fc2.weight",
    "language_model.decoder.layers.1.mlp.shared_experts.gate_weight",
    "language_model.decoder.layers.1.mlp.router.weight",
    "language_model.decoder.layers.0.self_attention.linear_qkv.weight",
    "hidden_projection.linear_fc1.weight",
    "code_predictor.decoder.layers.0.mlp.linear_fc1.weight",
    "code_predictor.embeddings.7.weight",
    "code_predictor.heads.14.weight",
]


@pytest.mark.parametrize("name", SENSITIVE)
def test_one_percent_on_one_weight_fails_the_gate(models, sharp_dir, name):
    """Sensitivity: scaling one weight tensor by 1.01 moves the talker's or the predictor's logits far outside the
    tolerance, so the gate can fail."""
    talker, ref = models
    batch = talker_batch(config_of(sharp_dir))
    param = dict(talker.named_parameters())[name]
    kept = param.detach().clone()
    try:
        with torch.no_grad():
            param.mul_(1.01)
        errors, _ = _errors(talker, ref, batch)
    finally:
        with torch.no_grad():
            param.copy_(kept)
    worst = max(errors["first"], errors["residual"])
    print(f"{name} x 1.01: {errors} ({worst / TOLERANCE:.0f} x the tolerance)")
    assert worst > 10 * TOLERANCE


def test_tiny_talker_is_small_and_shaped_like_the_release():
    """The embedded default's talker has every feature of the released one (MoE with a shared expert on every layer,
    norm_topk_prob, GQA with a query width of twice the hidden size, 16 code groups decoded by code2wav's 16
    quantizers, the accepted layer inside the thinker) at toy size."""
    from omni_model.configs import code_predictor_config_of, released_30b_a3b_config, talker_text_config_of, tiny_config

    for cfg in (tiny_config(), released_30b_a3b_config()):
        talker = cfg["talker_config"]
        text, predictor = talker_text_config_of(cfg), code_predictor_config_of(cfg)
        assert text["shared_expert_intermediate_size"] > 0 and text["num_experts_per_tok"] > 1 and text["norm_topk_prob"]
        assert text["num_attention_heads"] > text["num_key_value_heads"] > 1
        assert text["num_attention_heads"] * text["head_dim"] == 2 * text["hidden_size"]
        assert predictor["hidden_size"] == text["hidden_size"]
        assert talker["num_code_groups"] == predictor["num_code_groups"] == cfg["code2wav_config"]["num_quantizers"]
        assert 0 < talker["accept_hidden_layer"] <= cfg["thinker_config"]["text_config"]["num_hidden_layers"]
        assert talker["thinker_hidden_size"] == cfg["thinker_config"]["text_config"]["hidden_size"]
        assert predictor["rope_parameters"]["rope_theta"] == 1e6
    tiny = tiny_config()
    assert talker_text_config_of(tiny)["hidden_size"] <= 64 and talker_text_config_of(tiny)["num_hidden_layers"] <= 2


def test_tiny_talker_parameter_count(tiny_hf_dir):
    """Small: about 2.2 M parameters, most of them the code predictor's 15 embeddings and 15 heads (2048 x 32)."""
    import math

    from omni_model.convert.mapping import SafetensorsReader

    reader = SafetensorsReader(tiny_hf_dir)
    total = sum(math.prod(reader.shape(k)) for k in reader.keys() if k.startswith("talker."))
    print(f"tiny talker: {total / 1e6:.2f} M parameters")
    assert total < 4e6
