"""Packed rows take RoPE token by token (attention.per_token_rope_packing): the same numbers as mcore's THD path
(`_apply_rotary_pos_emb_thd`, a Python loop over the sequences with host syncs), to the last bit, forward and backward.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from llm_helpers import on_device_of, packed_text_row, tiny_language_model

warnings.filterwarnings("ignore")

LENGTHS = (7, 1, 12, 5)  # a one-token sequence too


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return tiny_language_model(tiny_hf_dir)


def packed_batch():
    return packed_text_row(LENGTHS, seed=20)


def logits_and_grads(m, per_token: bool):
    ids, pos, psp = on_device_of(m, *packed_batch())
    m.per_token_rope = per_token
    m.zero_grad(set_to_none=True)
    try:
        logits = m(input_ids=ids, position_ids=pos, packed_seq_params=psp)
        (logits.float().square().mean()).backward()
    finally:
        m.per_token_rope = True
    grads = {name: p.grad.clone() for name, p in m.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def test_per_token_rope_is_the_local_default(model):
    from omni_model.model.attention import per_token_rope_packing

    assert model.per_token_rope
    _, _, psp = packed_batch()
    assert per_token_rope_packing(psp).qkv_format == "sbhd"
    assert per_token_rope_packing(None) is None


def test_packed_rope_bit_identical_to_mcore_thd(model):
    """Logits and every gradient of a packed row: per-token RoPE == mcore's THD loop, 0 difference in fp32."""
    thd_logits, thd_grads = logits_and_grads(model, per_token=False)
    tok_logits, tok_grads = logits_and_grads(model, per_token=True)
    assert thd_logits.abs().max() > 0
    assert torch.equal(tok_logits, thd_logits), (tok_logits - thd_logits).abs().max()
    assert thd_grads.keys() == tok_grads.keys() and len(thd_grads) > 10
    for name, grad in thd_grads.items():
        assert torch.equal(tok_grads[name], grad), f"{name}: {(tok_grads[name] - grad).abs().max():.3e}"


def test_rope_op_equal_to_thd_op():
    """The op itself: mcore's unfused THD RoPE with per-token angles == its sbhd RoPE on [T, 1, h, d]."""
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd, apply_rotary_pos_emb
    from megatron.core.transformer.transformer_config import TransformerConfig

    from omni_model.runtime.parallel import init_parallel

    if not parallel_state.model_parallel_is_initialized():
        init_parallel()
    g = torch.Generator().manual_seed(0)
    total, heads, dim = sum(LENGTHS), 3, 16
    t = torch.randn(total, heads, dim, generator=g)
    freqs = torch.randn(total, 1, 1, dim, generator=g) * 5
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    config = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                               apply_rope_fusion=False)
    thd = apply_rotary_pos_emb(t, freqs, config, cu_seqlens=cu)
    sbhd = _apply_rotary_pos_emb_bshd(t.unsqueeze(1), freqs).squeeze(1)
    assert torch.equal(thd, sbhd)
