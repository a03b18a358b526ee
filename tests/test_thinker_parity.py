"""The whole thinker (audio + vision towers, multimodal merge, deepstack, MoE LLM) vs transformers, fp32 on CPU."""

from __future__ import annotations

import pytest
import torch

from llm_helpers import hf_thinker
from thinker_inputs import build_inputs, load_processors
from omni_model.configs import TOKEN_IDS

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def models(tiny_hf_dir):
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.thinker import build_thinker
    from omni_model.runtime.parallel import init_parallel

    # ours first: the CPU patches are then active while transformers builds its model (they once broke its
    # RoPE init by wrapping torch factories globally; this order keeps that from coming back)
    init_parallel()
    ours = build_thinker(tiny_hf_dir, dtype=torch.float32).eval()
    load_hf_into_model(ours, tiny_hf_dir, prefix="")
    return ours, hf_thinker(tiny_hf_dir)


@pytest.fixture(scope="module")
def processors(tiny_hf_dir):
    return load_processors(tiny_hf_dir)


def _compare(models, inputs):
    ours, ref = models
    attention = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        position_ids, _ = ref.model.get_rope_index(
            inputs["input_ids"], inputs.get("image_grid_thw"), inputs.get("video_grid_thw"), attention, False,
            inputs["feature_attention_mask"].sum(-1) if "feature_attention_mask" in inputs else None,
            inputs.get("video_second_per_grid"))
        expected = ref(attention_mask=attention, **inputs).logits
        mcore_inputs = {k: v for k, v in inputs.items() if k != "video_second_per_grid"}  # only feeds positions
        got = ours(position_ids=position_ids, **mcore_inputs)
    return (got - expected).abs().max().item()


CASES = {
    "text": dict(),
    "one_image": dict(n_images=1),
    "two_images_two_grids": dict(n_images=2),
    "one_audio": dict(audio_seconds=(1.0,)),
    "several_audios_long": dict(audio_seconds=(0.5, 2.3, 9.0)),
    "video": dict(video_frames=4),
    "image_audio_video": dict(n_images=1, audio_seconds=(1.5,), video_frames=4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(models, processors, case):
    error = _compare(models, build_inputs(processors, **CASES[case]))
    print(f"thinker parity {case}: max abs logit error {error:.2e}")
    assert error <= TOLERANCE


def test_placeholder_count_mismatch_is_a_clear_error(models, processors):
    from omni_model.model.thinker import PlaceholderMismatch

    inputs = build_inputs(processors, n_images=1)
    ids = inputs["input_ids"]
    first = int((ids[0] == TOKEN_IDS["image_pad"]).nonzero()[0])
    inputs["input_ids"] = torch.cat([ids[:, :first], ids[:, first + 1:]], dim=1)  # one image pad short
    position_ids = torch.arange(inputs["input_ids"].shape[1]).view(1, 1, -1).expand(3, 1, -1)
    with pytest.raises(PlaceholderMismatch, match=r"image: the input has \d+ .* produced \d+ embeddings"):
        models[0](position_ids=position_ids, **inputs)
    inputs = build_inputs(processors, audio_seconds=(1.0,))
    inputs.pop("input_features"), inputs.pop("feature_attention_mask")
    with pytest.raises(PlaceholderMismatch, match="audio: the input has 13"):
        models[0](position_ids=position_ids[..., :inputs["input_ids"].shape[1]], **inputs)
