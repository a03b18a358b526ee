"""The released 30B-A3B thinker (LLM + vision + audio) builds on the meta device; its parameter counts."""

from __future__ import annotations

import torch

# Published figures of the Qwen3-30B-A3B-class LLM: 30.5B total, 3.3B activated per token ("30B-A3B").
PUBLISHED_LLM_TOTAL, PUBLISHED_LLM_ACTIVE = 30.5e9, 3.3e9


def test_30b_thinker_on_meta_device_has_the_released_size():
    from omni_model.configs import released_30b_a3b_config
    from omni_model.model.language_model import count_model_parameters
    from omni_model.model.thinker import build_thinker
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    config = released_30b_a3b_config()
    with torch.device("meta"):
        thinker = build_thinker(config, dtype=torch.bfloat16, use_te=False, perform_initialization=False,
                                use_cpu_initialization=True)
    assert all(p.is_meta for p in thinker.parameters())
    # every parameter in the requested dtype (mcore's torch LayerNorm would silently make fp32 ones, which CUDA
    # then rejects against bf16 activations)
    assert {p.dtype for p in thinker.parameters()} == {torch.bfloat16}
    llm = count_model_parameters(thinker.language_model, config)
    vision = sum(p.numel() for p in thinker.vision_model.parameters())
    audio = sum(p.numel() for p in thinker.audio_model.parameters())
    total = llm["total"] + vision + audio
    print(f"30B-A3B thinker: LLM {llm['total']:,} (active/token {llm['active']:,}), vision {vision:,}, "
          f"audio {audio:,}, total {total:,}")
    assert abs(llm["total"] / PUBLISHED_LLM_TOTAL - 1) < 0.05
    assert abs(llm["active"] / PUBLISHED_LLM_ACTIVE - 1) < 0.05
    assert (vision, audio) == (538_631_408, 647_927_168)  # equal to transformers' towers at this shape
    assert abs(total / 31.7e9 - 1) < 0.01
