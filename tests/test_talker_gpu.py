"""The talker on one GPU (run on the H100/H200 machine: `pytest -m gpu tests/test_talker_gpu.py`).

* fp32: first-group and code-predictor logits equal transformers' (fp32, same GPU) to 1e-5 of max |logit|, also as a
  packed THD row (the flash varlen kernel does not take fp32: the exact per-sequence path).
* bf16 (the training dtype): as close to transformers' fp32 logits as transformers' own bf16 logits are, + BF16_MARGIN
  (the convert parity gate's criterion), through the packed varlen kernel; the training loss backpropagates.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llm_helpers import config_of, relative_error, sharpened_checkpoint
from talker_helpers import hf_inputs_embeds, hf_residual_logits, hf_talker, hf_talker_outputs, talker_batch
from omni_model.convert.parity import BF16_MARGIN

pytestmark = pytest.mark.gpu

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def sharp_dir(tiny_hf_dir, tmp_path_factory):
    return sharpened_checkpoint(tiny_hf_dir, tmp_path_factory.mktemp("sharp_talker_gpu") / "hf", parts=("talker.",))


def _ours(sharp_dir, dtype):
    from omni_model.convert.mapping import load_hf_into_talker
    from omni_model.model.talker import build_talker
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    talker = build_talker(config_of(sharp_dir), dtype=dtype)
    load_hf_into_talker(talker, sharp_dir)
    return talker.cuda().eval()


def _batch(sharp_dir, dtype):
    batch = talker_batch(config_of(sharp_dir)).to("cuda")
    return dataclasses.replace(batch, thinker_embeds=batch.thinker_embeds.to(dtype),
                               thinker_hidden=batch.thinker_hidden.to(dtype))


def _reference(sharp_dir, dtype, batch):
    ref = hf_talker(sharp_dir, dtype).cuda()
    with torch.no_grad():
        embeds = hf_inputs_embeds(ref, batch)
        first, hidden = hf_talker_outputs(ref, embeds, batch.position_ids)
        rows = hidden.reshape(-1, hidden.shape[-1])[batch.frame_positions]
        return first.float(), hf_residual_logits(ref, rows, batch.frame_codes).float()


def _run(talker, batch, **kw):
    with torch.no_grad():
        embeds = talker.inputs_embeds(batch.thinker_embeds, batch.codec_codes, batch.multimodal_mask,
                                      batch.thinker_hidden)
        out = talker(embeds, batch.position_ids, frame_positions=batch.frame_positions, frame_codes=batch.frame_codes,
                     **kw)
    return out.first.float(), out.residual.float()


def _as_one_packed_row(batch):
    from megatron.core.packed_seq_params import PackedSeqParams

    b, s = batch.labels.shape
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device="cuda")
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=s, max_seqlen_kv=s)
    packed = dataclasses.replace(
        batch, thinker_embeds=batch.thinker_embeds.reshape(1, b * s, -1),
        multimodal_mask=batch.multimodal_mask.reshape(1, b * s), codec_codes=batch.codec_codes.reshape(1, b * s, -1),
        position_ids=batch.position_ids.reshape(3, 1, b * s))
    return packed, psp


def test_fp32_talker_matches_transformers_on_gpu(sharp_dir):
    talker = _ours(sharp_dir, torch.float32)
    batch = _batch(sharp_dir, torch.float32)
    first, residual = _reference(sharp_dir, torch.float32, batch)
    ours = _run(talker, batch)
    packed, psp = _as_one_packed_row(batch)
    ours_packed = _run(talker, packed, packed_seq_params=psp)
    errors = {"first": relative_error(ours[0], first), "residual": relative_error(ours[1], residual),
              "packed_first": relative_error(ours_packed[0].reshape(first.shape), first),
              "packed_residual": relative_error(ours_packed[1], residual)}
    print("talker fp32 on GPU vs transformers (max abs err / max |ref|):", errors)
    assert all(err <= TOLERANCE for err in errors.values()), errors


def test_bf16_talker_close_to_transformers_and_trains(sharp_dir):
    from omni_model.train.talker_step import talker_loss

    batch32 = _batch(sharp_dir, torch.float32)
    first32, residual32 = _reference(sharp_dir, torch.float32, batch32)
    batch16 = _batch(sharp_dir, torch.bfloat16)
    hf16 = _reference(sharp_dir, torch.bfloat16, batch16)
    talker = _ours(sharp_dir, torch.bfloat16)
    packed, psp = _as_one_packed_row(batch16)
    ours = _run(talker, packed, packed_seq_params=psp)
    ours = (ours[0].reshape(first32.shape), ours[1])
    for name, got, theirs, expected in (("first", ours[0], hf16[0], first32), ("residual", ours[1], hf16[1], residual32)):
        err, hf_err = relative_error(got, expected), relative_error(theirs, expected)
        print(f"bf16 {name}: ours {err:.2e}, transformers bf16 {hf_err:.2e} (vs transformers fp32)")
        assert err <= BF16_MARGIN * hf_err  # transformers' own bf16 error + 25 %
    talker.train()
    loss = talker_loss(talker, batch16, predictor_weight=0.3)
    loss.total.backward()
    grads = [p.grad for p in talker.parameters() if p.grad is not None]
    assert torch.isfinite(loss.total) and len(grads) == sum(1 for _ in talker.parameters())
    assert all(torch.isfinite(g).all() for g in grads)
