"""The released 30B-A3B thinker LLM shape instantiates on the meta device; its parameter counts."""

from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore")

# closed form from the released values (48 layers, hidden 2048, 32/4 heads x 128, 128 experts x 3*2048*768, top-8,
# vocab 152064, untied): per layer attn 18,878,720 + router 262,144 + experts 603,979,776
LLM_TOTAL_30B = 30_532_646_912
LLM_ACTIVE_30B = 3_353_556_992


def test_30b_llm_on_meta_device():
    from omni_model.configs import released_30b_a3b_config
    from omni_model.model.language_model import build_language_model, count_model_parameters, count_parameters
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    cfg = released_30b_a3b_config()
    with torch.device("meta"):
        model = build_language_model(
            cfg, dtype=torch.bfloat16, use_te=False, perform_initialization=False, use_cpu_initialization=True
        )
    assert all(p.is_meta for p in model.parameters())
    counted = count_model_parameters(model, cfg)
    closed = count_parameters(cfg)
    print(f"30B-A3B thinker LLM: total {counted['total']:,} active/token {counted['active']:,}")
    assert counted == closed == {"total": LLM_TOTAL_30B, "active": LLM_ACTIVE_30B}
    layer = model.decoder.layers[0]
    assert layer.self_attention.linear_qkv.weight.shape == (40 * 128, 2048)
    assert layer.mlp.experts.linear_fc1.weight.shape == (128, 2 * 768, 2048)
    assert layer.mlp.experts.state_dict()["linear_fc1.weight0"].shape == (2 * 768, 2048)
    assert len(model.decoder.layers) == 48 and model.output_layer.weight.shape == (152064, 2048)
    assert model.rotary_pos_emb.mrope_section == [24, 20, 20]
