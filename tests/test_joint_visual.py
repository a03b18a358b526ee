"""PerfOptions.joint_visual_forward: a micro-batch's images and videos through the vision tower in ONE forward,
split at the images' merged-token count, against one forward each (transformers' way). The tiny thinker (fp32, CPU,
sharpened weights: O(1) activations, so a misplaced row shows), two images and two videos of different grids
interleaved over two rows with audio: decoder input, visual_pos_masks, every deepstack level and the logits agree
(measured: max abs difference 0 on CPU, every row goes through the same per-row arithmetic), every vision-tower
gradient to fp32 rounding of its row sums (GRAD_ATOL); the joint mode calls the tower once where the apart mode calls
it twice. A batch with only images or only videos calls it once either way."""

from __future__ import annotations

import pytest
import torch

from encoder_parity_utils import vision_inputs
from llm_helpers import sharp_fp32_thinker
from omni_model.configs import TOKEN_IDS

IMAGE_GRIDS = [[1, 4, 6], [1, 8, 4]]
VIDEO_GRIDS = [[2, 4, 4], [3, 6, 4]]
AUDIO_FRAMES = 300
TOL = dict(rtol=1e-5, atol=1e-6)
# the weight gradients sum over every patch row: one GEMM over images and videos against two summed by autograd, a
# different fp32 summation order (measured: at most 5.6e-7 of a parameter's largest gradient entry, ~5 eps)
GRAD_ATOL = 2e-6


@pytest.fixture(scope="module")
def thinker(tiny_hf_dir, tmp_path_factory):
    return sharp_fp32_thinker(tiny_hf_dir, tmp_path_factory.mktemp("sharp") / "hf")


def _ids(rows: list[list[tuple[str, int]]]) -> torch.Tensor:
    """[B, S] ids: each row a list of (kind, n) runs (text tokens or n placeholders), padded with text."""
    g = torch.Generator().manual_seed(0)
    pads = {"image": TOKEN_IDS["image_pad"], "video": TOKEN_IDS["video_pad"], "audio": TOKEN_IDS["audio_pad"]}
    built = [torch.cat([torch.full((n,), pads[kind]) if kind in pads else torch.randint(100, 5000, (n,), generator=g)
                        for kind, n in row]) for row in rows]
    length = max(len(r) for r in built)
    return torch.stack([torch.cat([r, torch.randint(100, 5000, (length - len(r),), generator=g)]) for r in built])


def _merged(grid) -> int:
    t, h, w = grid
    return t * h * w // 4


def _audio(n: int = 1):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    features = torch.randn(n, 128, AUDIO_FRAMES, generator=torch.Generator().manual_seed(5))
    tokens = int(_get_feat_extract_output_lengths(torch.tensor(AUDIO_FRAMES)))
    return {"input_features": features, "feature_attention_mask": torch.ones(n, AUDIO_FRAMES, dtype=torch.long)}, tokens


def _inputs(images=IMAGE_GRIDS, videos=VIDEO_GRIDS) -> dict:
    """Two rows: row 0 audio, the first image, the first video; row 1 the second video BEFORE the second image."""
    audio, n_audio = _audio()
    image, video = ([(kind, _merged(g)) for g in grids] for kind, grids in (("image", images), ("video", videos)))

    def runs(*media):
        return [run for k, m in enumerate(media) for run in (m, ("text", 2 + k))]

    rows = [[("text", 5), ("audio", n_audio), ("text", 3)] + runs(*image[:1], *video[:1]),
            [("text", 2)] + runs(*video[1:], *image[1:])]
    out = {"input_ids": _ids(rows), **audio}
    if images:
        out["pixel_values"], out["image_grid_thw"] = vision_inputs(images, seed=1)
    if videos:
        out["pixel_values_videos"], out["video_grid_thw"] = vision_inputs(videos, seed=2)
    return out


def _embed(thinker, inputs, joint: bool):
    from omni_model.model.options import PerfOptions, apply_options

    apply_options(thinker, PerfOptions(joint_visual_forward=joint))
    assert thinker.joint_visual_forward is joint
    return thinker.embed_multimodal(**inputs)


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_joint_forward_gives_the_two_forwards_outputs(thinker):
    inputs = _inputs()
    ids = inputs["input_ids"]
    assert (ids == TOKEN_IDS["image_pad"]).any(1).all() and (ids == TOKEN_IDS["video_pad"]).any(1).all()
    with torch.no_grad():
        joint, apart = _embed(thinker, inputs, True), _embed(thinker, inputs, False)
    (embeds, masks, deepstack), (embeds_ref, masks_ref, deepstack_ref) = joint, apart
    assert torch.equal(masks, masks_ref) and int(masks.sum()) == sum(map(_merged, IMAGE_GRIDS + VIDEO_GRIDS))
    assert len(deepstack) == len(deepstack_ref) == 3
    torch.testing.assert_close(embeds, embeds_ref, **TOL)
    for level, level_ref in zip(deepstack, deepstack_ref):
        torch.testing.assert_close(level, level_ref, **TOL)
    diffs = [_max_diff(embeds, embeds_ref)] + [_max_diff(a, b) for a, b in zip(deepstack, deepstack_ref)]
    print(f"joint vs two vision forwards: max abs difference {max(diffs):.2e} (decoder input, deepstack levels)")
    # the visual rows move the decoder input and differ between items: a row shifted by one group would show
    visual = embeds_ref[masks_ref.T]
    assert visual.std() > 0.1 and _max_diff(visual[1:], visual[:-1]) > 0.1

    logits = [_logits(thinker, inputs, joint) for joint in (True, False)]
    torch.testing.assert_close(logits[0], logits[1], **TOL)
    print(f"joint vs two vision forwards: max abs logit difference {_max_diff(*logits):.2e}")


def _logits(thinker, inputs, joint: bool):
    from omni_model.model.options import PerfOptions, apply_options

    apply_options(thinker, PerfOptions(joint_visual_forward=joint))
    ids = inputs["input_ids"]
    position_ids = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, ids.shape[0], -1)
    with torch.no_grad():
        return thinker(position_ids=position_ids, **inputs)


def _tower_grads(thinker, inputs, joint: bool) -> dict:
    thinker.zero_grad(set_to_none=True)
    embeds, masks, deepstack = _embed(thinker, inputs, joint)
    g = torch.Generator().manual_seed(7)
    loss = (embeds * torch.randn(embeds.shape, generator=g)).sum()
    loss = loss + sum((level * torch.randn(level.shape, generator=g)).sum() for level in deepstack)
    loss.backward()
    return {name: p.grad.clone() for name, p in thinker.vision_model.named_parameters()}


def test_joint_forward_gives_the_two_forwards_tower_gradients(thinker):
    inputs = _inputs()
    assert all(p.requires_grad for p in thinker.vision_model.parameters())
    joint, apart = _tower_grads(thinker, inputs, True), _tower_grads(thinker, inputs, False)
    thinker.zero_grad(set_to_none=True)
    assert joint.keys() == apart.keys() and len(joint) > 20
    for name in joint:  # each parameter's gradient in units of its largest entry (a weight gradient sums all rows)
        scale = apart[name].abs().max()
        assert scale > 0, name
        torch.testing.assert_close(joint[name] / scale, apart[name] / scale, rtol=1e-5, atol=GRAD_ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")
    print(f"joint vs two vision forwards: tower gradients, max abs difference "
          f"{max(_max_diff(joint[n], apart[n]) for n in joint):.2e}, at most "
          f"{max(_max_diff(joint[n], apart[n]) / apart[n].abs().max() for n in joint):.2e} of a parameter's largest "
          f"gradient entry ({len(joint)} parameters)")


def _tower_calls(thinker, inputs, joint: bool) -> tuple:
    calls = []
    hook = thinker.vision_model.register_forward_pre_hook(lambda module, args: calls.append(args[1].tolist()))
    try:
        with torch.no_grad():
            out = _embed(thinker, inputs, joint)
    finally:
        hook.remove()
    return calls, out


def test_joint_mode_calls_the_tower_once_for_images_and_videos(thinker):
    inputs = _inputs()
    joint, _ = _tower_calls(thinker, inputs, True)
    apart, _ = _tower_calls(thinker, inputs, False)
    assert joint == [IMAGE_GRIDS + VIDEO_GRIDS]
    assert apart == [IMAGE_GRIDS, VIDEO_GRIDS]


@pytest.mark.parametrize("kind", ["images", "videos"])
def test_one_media_kind_is_one_call_either_way(thinker, kind):
    inputs = _inputs(images=IMAGE_GRIDS if kind == "images" else [], videos=VIDEO_GRIDS if kind == "videos" else [])
    grids = IMAGE_GRIDS if kind == "images" else VIDEO_GRIDS
    (joint, out), (apart, out_ref) = _tower_calls(thinker, inputs, True), _tower_calls(thinker, inputs, False)
    assert joint == apart == [grids]
    assert torch.equal(out[0], out_ref[0]) and torch.equal(out[1], out_ref[1])
    assert all(torch.equal(a, b) for a, b in zip(out[2], out_ref[2]))


@pytest.mark.parametrize("short", ["image", "video"])
def test_joint_mode_names_a_placeholder_count_mismatch(thinker, short):
    from omni_model.model.options import PerfOptions, apply_options
    from omni_model.model.thinker import PlaceholderMismatch

    inputs = _inputs()
    ids = inputs["input_ids"].clone()
    first = (ids == TOKEN_IDS[f"{short}_pad"]).nonzero()[0]
    ids[first[0], first[1]] = 42  # one placeholder short
    grids = IMAGE_GRIDS if short == "image" else VIDEO_GRIDS
    n = sum(map(_merged, grids))
    apply_options(thinker, PerfOptions(joint_visual_forward=True))
    with torch.no_grad(), pytest.raises(PlaceholderMismatch, match=rf"{short}: the input has {n - 1} <{short} pad> "
                                                                   rf"tokens but the {short} encoder produced {n}"):
        thinker.embed_multimodal(**{**inputs, "input_ids": ids})


def test_joint_mode_without_a_vision_tower_names_the_inputs(thinker, monkeypatch):
    monkeypatch.setattr(thinker, "vision_model", None)
    with pytest.raises(ValueError, match="image inputs given but this thinker has no vision tower"):
        _embed(thinker, _inputs(), True)
