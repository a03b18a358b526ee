"""The whole thinker in bf16 on one GPU vs transformers (run on the H100/H200 machine: `pytest -m gpu`).

bf16 cannot match fp32 to 1e-4. The criterion is the convert parity gate's: our bf16 logits are as close to
transformers' fp32 logits as transformers' own bf16 logits are, + 25 % (BF16_MARGIN), on a mixed image + audio +
video input.
"""

from __future__ import annotations

import pytest
import torch

from llm_helpers import hf_thinker
from thinker_inputs import build_inputs, load_processors
from omni_model.convert.parity import BF16_MARGIN

pytestmark = pytest.mark.gpu


def test_bf16_thinker_close_to_hf_on_mixed_media(tiny_hf_dir):
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.thinker import build_thinker
    from omni_model.runtime.parallel import init_parallel

    ref32 = hf_thinker(tiny_hf_dir, torch.float32).cuda()
    ref16 = hf_thinker(tiny_hf_dir, torch.bfloat16).cuda()
    init_parallel()
    ours = build_thinker(tiny_hf_dir, dtype=torch.bfloat16)
    load_hf_into_model(ours, tiny_hf_dir, prefix="")
    ours = ours.cuda().eval()

    inputs = {k: v.cuda() for k, v in build_inputs(load_processors(tiny_hf_dir), n_images=1, audio_seconds=(1.5, 3.0), video_frames=4).items()}
    attention = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        position_ids, _ = ref32.model.get_rope_index(
            inputs["input_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"], attention, False,
            inputs["feature_attention_mask"].sum(-1), inputs["video_second_per_grid"])
        expected = ref32(attention_mask=attention, **inputs).logits.float()
        half = {k: (v.bfloat16() if v.is_floating_point() and k != "video_second_per_grid" else v) for k, v in inputs.items()}
        hf_half = ref16(attention_mask=attention, **half).logits.float()
        ours_inputs = {k: v for k, v in half.items() if k != "video_second_per_grid"}  # it only feeds the positions
        got = ours(position_ids=position_ids, **ours_inputs).float()
    err, hf_err = (got - expected).abs().max().item(), (hf_half - expected).abs().max().item()
    print(f"thinker bf16 (ours) vs HF fp32: {err:.3e}; HF bf16 vs HF fp32: {hf_err:.3e}")
    assert err <= BF16_MARGIN * hf_err
