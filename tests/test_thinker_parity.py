"""The whole thinker (audio + vision towers, multimodal merge, deepstack, MoE LLM) vs transformers, fp32 on CPU, with
sharpened weights (llm_helpers.sharpened_checkpoint: towers and LLM with O(1) activations, so every path visibly moves
the logits). Parity holds to 2e-5 of the largest reference logit (measured: at most 4.4e-6, two images); the negative
controls (the H and W position axes exchanged: 2.6e-2; two vision layers' attention weights exchanged: 1.1; two audio
layers' likewise: 1.3) are over 100 times that."""

from __future__ import annotations

import pytest
import torch

from llm_helpers import hf_thinker, relative_error, sharpened_checkpoint
from thinker_inputs import build_inputs, load_processors
from omni_model.configs import TOKEN_IDS

TOLERANCE = 2e-5  # of max |reference logit|


@pytest.fixture(scope="module")
def sharp_dir(tiny_hf_dir, tmp_path_factory):
    return sharpened_checkpoint(tiny_hf_dir, tmp_path_factory.mktemp("sharp") / "hf")


@pytest.fixture(scope="module")
def models(sharp_dir):
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.thinker import build_thinker
    from omni_model.runtime.parallel import init_parallel

    # ours first: the CPU patches are then active while transformers builds its model (they once broke its
    # RoPE init by wrapping torch factories globally; this order keeps that from coming back)
    init_parallel()
    ours = build_thinker(sharp_dir, dtype=torch.float32).eval()
    load_hf_into_model(ours, sharp_dir, prefix="")
    return ours, hf_thinker(sharp_dir)


@pytest.fixture(scope="module")
def processors(tiny_hf_dir):
    return load_processors(tiny_hf_dir)


def _logits(models, inputs, axes=(0, 1, 2)):
    """(ours, transformers') logits; `axes` reorders our MRoPE position axes (a negative control)."""
    ours, ref = models
    attention = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        position_ids, _ = ref.model.get_rope_index(
            inputs["input_ids"], inputs.get("image_grid_thw"), inputs.get("video_grid_thw"), attention, False,
            inputs["feature_attention_mask"].sum(-1) if "feature_attention_mask" in inputs else None,
            inputs.get("video_second_per_grid"))
        expected = ref(attention_mask=attention, **inputs).logits
        mcore_inputs = {k: v for k, v in inputs.items() if k != "video_second_per_grid"}  # only feeds positions
        got = ours(position_ids=position_ids[list(axes)], **mcore_inputs)
    return got, expected


def _compare(models, inputs):
    got, expected = _logits(models, inputs)
    assert expected.abs().max() > 3 and expected.std() > 1  # sharpened: logits that depend on the input
    return relative_error(got, expected)


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
    print(f"thinker parity {case}: max abs logit error {error:.2e} of max |logit|")
    assert error <= TOLERANCE


def _swapped_layers(tower, name: str):
    """The parameter `name` of a tower's first two layers, to exchange their values."""
    params = dict(tower.named_parameters())
    return params[f"decoder.layers.0.{name}"], params[f"decoder.layers.1.{name}"]


@pytest.mark.parametrize("control", ["hw_axes", "vision_layers", "audio_layers"])
def test_negative_controls_are_far_outside_the_tolerance(models, processors, control):
    """What a slip in the positions or in a tower's weight mapping looks like, on the mixed case: far outside."""
    ours, _ = models
    inputs = build_inputs(processors, **CASES["image_audio_video"])
    if control == "hw_axes":
        got, expected = _logits(models, inputs, axes=(0, 2, 1))
    else:
        tower = ours.vision_model if control == "vision_layers" else ours.audio_model
        first, second = _swapped_layers(tower, "self_attention.linear_qkv.weight")
        kept = first.detach().clone()
        try:
            with torch.no_grad():
                first.copy_(second)
                second.copy_(kept)
            got, expected = _logits(models, inputs)
        finally:
            with torch.no_grad():
                second.copy_(first)
                first.copy_(kept)
    error = relative_error(got, expected)
    print(f"thinker negative control {control}: {error:.2e} of max |logit|")
    assert error > 100 * TOLERANCE


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
