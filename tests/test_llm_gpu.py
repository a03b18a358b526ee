"""GPU checks of the LLM (run by the lead on an H100: `pytest -m gpu tests/test_llm_gpu.py tests/test_llm_parallel.py`).

bf16 on one GPU: our model (TE spec if transformer_engine imports, else the local spec: SDPA + torch._grouped_mm
experts) against transformers' thinker. bf16 cannot match fp32 to 1e-4; the criterion is the convert parity gate's:
our bf16 logits are as close to the fp32 reference as transformers' own bf16 logits are, + 10 % (BF16_MARGIN; H200
before this rule: 1.478e-2 vs 1.477e-2). A negative control (two experts swapped in one layer) must fail it.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from llm_helpers import config_of, deepstack_inputs, hf_text_logits, hf_thinker, text_batch
from omni_model.convert.parity import BF16_MARGIN

warnings.filterwarnings("ignore")
pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_models(tiny_hf_dir):
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.language_model import build_language_model
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    m = build_language_model(config_of(tiny_hf_dir), dtype=torch.bfloat16)
    load_hf_into_model(m, tiny_hf_dir)
    th32 = hf_thinker(tiny_hf_dir, torch.float32).cuda()
    th16 = hf_thinker(tiny_hf_dir, torch.bfloat16).cuda()
    return m.cuda().eval(), th32, th16


def test_bf16_logits_close_to_hf(gpu_models):
    m, th32, th16 = gpu_models
    ids, pos = text_batch(b=2, s=64)
    ids, pos = ids.cuda(), pos.cuda()
    mask, ds = deepstack_inputs(ids.shape, 64, 3)
    mask, ds = mask.cuda(), [t.cuda() for t in ds]
    with torch.no_grad():
        ours = m(input_ids=ids, position_ids=pos, visual_pos_masks=mask, deepstack_visual_embeds=ds).float()
    ref32 = hf_text_logits(th32, ids, pos, [t.float() for t in ds], mask).float()
    ref16 = hf_text_logits(th16, ids, pos, [t.bfloat16() for t in ds], mask).float()
    err, hf_err = (ours - ref32).abs().max().item(), (ref16 - ref32).abs().max().item()
    print(f"bf16 ours vs HF fp32: {err:.3e}; HF bf16 vs HF fp32: {hf_err:.3e}")
    assert err <= BF16_MARGIN * hf_err
    fc1 = m.decoder.layers[0].mlp.experts.linear_fc1.weight
    kept = fc1.detach().clone()
    with torch.no_grad():
        try:
            fc1[[0, 1]] = kept[[1, 0]]
            wrong = m(input_ids=ids, position_ids=pos, visual_pos_masks=mask, deepstack_visual_embeds=ds).float()
        finally:
            fc1.copy_(kept)
    print(f"negative control (experts 0/1 swapped in layer 0) vs HF fp32: {(wrong - ref32).abs().max():.3e}")
    assert (wrong - ref32).abs().max().item() > BF16_MARGIN * hf_err


def test_bf16_grouped_mm_equals_loop():
    from omni_model.model.experts import grouped_gemm

    g = torch.Generator(device="cuda").manual_seed(0)
    splits = [5, 0, 17, 3, 0, 9, 1, 29]
    x = torch.randn(sum(splits), 256, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    w = torch.randn(8, 128, 256, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    y = grouped_gemm(x, w, splits)
    y2 = grouped_gemm(x, w, splits, backend="loop")
    assert (y.float() - y2.float()).abs().max() <= 0.05 * y2.float().abs().max()
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    gx2, gw2 = torch.autograd.grad(y2, (x, w), dy)
    assert (gx.float() - gx2.float()).abs().max() <= 0.05 * gx2.float().abs().max()
    assert (gw.float() - gw2.float()).abs().max() <= 0.05 * gw2.float().abs().max()


def test_bf16_packed_thd_equals_separate(gpu_models):
    """Packed rows through torch's flash varlen kernel (not the per-sequence loop: it failed over to that silently on
    torch 2.11 once) equal each sequence alone."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from omni_model.model import attention

    assert attention.varlen_applies(torch.zeros(1, device="cuda", dtype=torch.bfloat16))
    m, _, _ = gpu_models
    ids_a, pos_a = text_batch(b=1, s=40, seed=11)
    ids_b, pos_b = text_batch(b=1, s=24, seed=12)
    with torch.no_grad():
        la = m(input_ids=ids_a.cuda(), position_ids=pos_a.cuda()).float()
        lb = m(input_ids=ids_b.cuda(), position_ids=pos_b.cuda()).float()
        cu = torch.tensor([0, 40, 64], dtype=torch.int32, device="cuda")
        psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=40, max_seqlen_kv=40)
        packed = m(
            input_ids=torch.cat([ids_a, ids_b], 1).cuda(),
            position_ids=torch.cat([pos_a, pos_b], 2).cuda(),
            packed_seq_params=psp,
        ).float()
    err = max((packed[:, :40] - la).abs().max().item(), (packed[:, 40:] - lb).abs().max().item())
    print(f"bf16 packed vs separate: {err:.3e}")
    assert err <= 0.1


def test_training_step_bf16_through_schedule(gpu_models):
    """One forward/backward through mcore's schedule in bf16 (grads finite, expert grads present)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from omni_model.train.forward_step import clear_moe_aux_loss_scale

    m, _, _ = gpu_models
    ids, pos = text_batch(b=2, s=64)
    ids, pos = ids.cuda(), pos.cuda()
    m.train()
    try:

        def step(_, model):
            clear_moe_aux_loss_scale()  # the tests before this one ran backwards outside a schedule
            out = model(input_ids=ids, position_ids=pos, labels=torch.roll(ids, -1, 1))
            return out, lambda o: (o.float().mean(), {})

        get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([None]), model=[m], num_microbatches=1,
            seq_length=64, micro_batch_size=2, forward_only=False,
        )
        grads = [p.grad for n, p in m.named_parameters() if ".experts." in n]
        assert any(g is not None for g in grads)
        assert all(torch.isfinite(g).all() for g in grads if g is not None)
    finally:
        m.zero_grad(set_to_none=True)
        m.eval()
