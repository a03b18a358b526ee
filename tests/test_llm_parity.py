"""The mcore thinker LLM (local spec, fp32, CPU) against transformers' thinker on the tiny random checkpoint with
sharpened weights (llm_helpers.sharpened_checkpoint: logits of magnitude ~7, routing and attention that depend on the
input; the raw 0.02-std weights give logits below 1 that barely move). Parity holds to 1e-5 of the largest reference
logit (measured: 9.4e-7 relative); the negative controls (two experts swapped in one layer, the H and W position axes
swapped) move the logits by ~1e5 times that tolerance."""

from __future__ import annotations

import warnings

import pytest
import torch

from llm_helpers import (config_of, deepstack_inputs, hf_text_logits, hf_thinker, relative_error,
                         sharpened_checkpoint, text_batch)

warnings.filterwarnings("ignore")

TOLERANCE = 1e-5  # of max |reference logit|


@pytest.fixture(scope="module")
def models(tiny_hf_dir, tmp_path_factory):
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.language_model import build_language_model
    from omni_model.runtime.parallel import init_parallel

    sharp_dir = sharpened_checkpoint(tiny_hf_dir, tmp_path_factory.mktemp("sharp") / "hf")
    init_parallel()
    m = build_language_model(config_of(sharp_dir), dtype=torch.float32, use_te=False)
    load_hf_into_model(m, sharp_dir)
    return m.eval(), hf_thinker(sharp_dir)


def test_text_logits_match_hf(models):
    m, th = models
    ids, pos = text_batch(b=2, s=12)
    with torch.no_grad():
        out = m(input_ids=ids, position_ids=pos)
    ref = hf_text_logits(th, ids, pos)
    err = relative_error(out, ref)
    print(f"text logits max abs err vs HF: {err:.3e} of max |logit| {ref.abs().max():.2f}")
    assert ref.abs().max() > 3 and ref.std() > 1  # sharpened: logits that depend on the input
    assert err <= TOLERANCE


def test_negative_controls_are_far_outside_the_tolerance(models):
    """What a mapping slip looks like (two experts' weights exchanged in one layer; the H and W MRoPE axes
    exchanged) is ~1e5 times the tolerance: the parity tests can fail."""
    m, th = models
    ids, pos = text_batch(b=2, s=12)
    ref = hf_text_logits(th, ids, pos)
    fc1 = m.decoder.layers[0].mlp.experts.linear_fc1.weight
    kept = fc1.detach().clone()
    with torch.no_grad():
        try:
            fc1[[0, 1]] = kept[[1, 0]]
            swapped_experts = m(input_ids=ids, position_ids=pos)
        finally:
            fc1.copy_(kept)
        swapped_axes = m(input_ids=ids, position_ids=pos[[0, 2, 1]])
    for wrong in (swapped_experts, swapped_axes):
        assert relative_error(wrong, ref) > 1000 * TOLERANCE


def test_text_logits_match_hf_plain_positions(models):
    """2-D position ids (text-only) equal HF with its default arange positions."""
    m, th = models
    ids, _ = text_batch(b=1, s=10, seed=3)
    pos2d = torch.arange(10).view(1, 10)
    with torch.no_grad():
        out = m(input_ids=ids, position_ids=pos2d)
        lm = th.model.language_model
        ref = th.lm_head(lm(input_ids=ids).last_hidden_state)
    assert relative_error(out, ref) <= TOLERANCE


def test_deepstack_matches_hf(models):
    m, th = models
    ids, pos = text_batch(b=2, s=12, seed=5)
    mask, ds = deepstack_inputs(ids.shape, 64, 3)
    with torch.no_grad():
        out = m(input_ids=ids, position_ids=pos, visual_pos_masks=mask, deepstack_visual_embeds=ds)
        plain = m(input_ids=ids, position_ids=pos)
    ref = hf_text_logits(th, ids, pos, deepstack=ds, visual_mask=mask)
    err = relative_error(out, ref)
    print(f"deepstack logits max abs err vs HF: {err:.3e} of max |logit|")
    assert err <= TOLERANCE
    assert (out - plain).abs().max() > 1e-3  # the features did change the output


def test_decoder_input_path_equals_ids(models):
    m, _ = models
    ids, pos = text_batch(b=2, s=8, seed=7)
    with torch.no_grad():
        a = m(input_ids=ids, position_ids=pos)
        b = m(decoder_input=m.embed(ids), position_ids=pos)
    assert torch.equal(a, b)


def test_packed_thd_equals_separate(models):
    """Two sequences packed into one THD row (cu_seqlens) give each sequence's own logits."""
    from megatron.core.packed_seq_params import PackedSeqParams

    m, _ = models
    ids_a, pos_a = text_batch(b=1, s=7, seed=11)
    ids_b, pos_b = text_batch(b=1, s=5, seed=12)
    with torch.no_grad():
        la = m(input_ids=ids_a, position_ids=pos_a)
        lb = m(input_ids=ids_b, position_ids=pos_b)
        cu = torch.tensor([0, 7, 12], dtype=torch.int32)
        psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7)
        packed = m(
            input_ids=torch.cat([ids_a, ids_b], 1),
            position_ids=torch.cat([pos_a, pos_b], 2),
            packed_seq_params=psp,
        )
    err = max((packed[:, :7] - la).abs().max().item(), (packed[:, 7:] - lb).abs().max().item())
    print(f"packed vs separate max abs err: {err:.3e}")
    assert err <= 1e-5


def test_grouped_gemm_experts_equal_loop(models):
    m, _ = models
    ids, pos = text_batch(b=2, s=12, seed=13)
    experts = [l.mlp.experts for l in m.decoder.layers]
    m.train()
    try:
        outs, grads = [], []
        for backend in ("auto", "loop"):
            for e in experts:
                e.set_backend(backend)
            m.zero_grad(set_to_none=True)
            out = m(input_ids=ids, position_ids=pos)
            out.float().pow(2).mean().backward()
            outs.append(out.detach())
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None and ".experts." in n})
    finally:
        for e in experts:
            e.set_backend("auto")
        m.zero_grad(set_to_none=True)
        m.eval()
    assert torch.allclose(outs[0], outs[1], atol=1e-6, rtol=0)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-7, rtol=1e-5), n


def test_rope_matches_hf(models):
    _, th = models
    from omni_model.model.rope import InterleavedMRoPE

    lm = th.model.language_model
    _, pos = text_batch(b=2, s=12)
    x = torch.zeros(1, dtype=torch.float32)
    cos_ref, sin_ref = lm.rotary_emb(x, pos)  # [B, S, D]
    emb = InterleavedMRoPE(16, 1e6, [4, 2, 2])(pos)  # [S, B, 1, D]
    assert torch.equal(emb.cos()[:, :, 0].transpose(0, 1), cos_ref)
    assert torch.equal(emb.sin()[:, :, 0].transpose(0, 1), sin_ref)


@pytest.mark.parametrize("gqa", [True, False])
def test_sdpa_equals_mcore_dot_product_attention(models, gqa):
    """SDPAttention == mcore's local DotProductAttention (causal, GQA), values and input grads."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from omni_model.model.attention import SDPAttention

    m, _ = models
    cfg = m.config
    if not gqa:
        import dataclasses

        cfg = dataclasses.replace(cfg, num_query_groups=cfg.num_attention_heads)
    sdpa = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    g = torch.Generator().manual_seed(0)
    s, b, nh, ng, hd = 9, 2, cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    q = torch.randn(s, b, nh, hd, generator=g, requires_grad=True)
    k = torch.randn(s, b, ng, hd, generator=g, requires_grad=True)
    v = torch.randn(s, b, ng, hd, generator=g, requires_grad=True)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1).view(1, 1, s, s)
    a = sdpa(q, k, v, None)
    r = ref(q, k, v, causal)
    err = (a - r).abs().max().item()
    print(f"SDPA vs DotProductAttention max abs err (gqa={gqa}): {err:.3e}")
    assert err <= 1e-6
    ga = torch.autograd.grad(a.sum(), (q, k, v))
    gr = torch.autograd.grad(r.sum(), (q, k, v))
    for x, y in zip(ga, gr):
        assert (x - y).abs().max() <= 1e-5
