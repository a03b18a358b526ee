"""Audio encoder (AuT) vs transformers' Qwen3OmniMoeAudioEncoder.

CPU, fp32, tiny checkpoint weights loaded through the production Mapper (rows + "qkv" transform), raw and
`sharpen()`-ed (O(1) activations). Measured max abs error: 0.0 (bit-identical) for every case, raw and sharpened
(same per-window SDPA calls and the same op order as transformers' sdpa path). Output lengths == HF's
`_get_feat_extract_output_lengths`.
"""

from __future__ import annotations


import pytest
import torch

from encoder_parity_utils import (
    assert_rows_round_trip,
    audio_inputs,
    hf_audio_reference,
    hf_config_dict,
    hf_grads_as_mcore,
    load_tower,
    load_hf_encoder_tensors,
    sharpen,
)

CASES = {
    "one_short_clip": [60],  # < one 100-frame chunk
    "one_full_chunk": [100],
    "one_clip_3_chunks": [237],  # > n_window chunk, partial tail
    "three_clips": [60, 350, 1000],  # 1000 > n_window_infer (800): two attention windows
    "long_and_short": [1730, 45, 800],  # 1730 frames: 225 tokens = 3 windows (104+104+17)
}
TOL = 1e-5


@pytest.fixture(scope="module")
def parallel():
    from omni_model.runtime.parallel import init_parallel

    init_parallel(tp=1)
    yield


@pytest.fixture(scope="module")
def weights(tiny_hf_dir):
    raw = load_hf_encoder_tensors(tiny_hf_dir)
    return {"raw": raw, "sharp": sharpen(raw)}


@pytest.fixture(scope="module")
def models(tiny_hf_dir, weights, parallel):
    from omni_model.model.audio import AudioEncoder

    cfg = hf_config_dict(tiny_hf_dir)
    out = {}
    for kind, tensors in weights.items():
        ours = AudioEncoder(cfg).eval()
        load_tower(ours, tensors, cfg, "audio_model.")
        out[kind] = (ours, hf_audio_reference(tiny_hf_dir, tensors))
    return out


@pytest.mark.parametrize("kind", ["raw", "sharp"])
@pytest.mark.parametrize("case", list(CASES))
def test_audio_matches_hf(models, kind, case):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    ours, ref = models[kind]
    feats, lens = audio_inputs(CASES[case])
    with torch.no_grad():
        expect = ref(feats, lens).last_hidden_state
        got = ours(feats, lens)
    assert got.shape == (int(_get_feat_extract_output_lengths(lens).sum()), 64)
    err = (got - expect).abs().max().item()
    print(f"audio {kind} {case}: max abs err {err:.3g}, |out| max {expect.abs().max():.3g}")
    assert err <= TOL


def test_audio_padded_batch_input(models):
    """HF processor layout: [n, 128, T] + feature_attention_mask gives the same as the concatenated form."""
    ours, ref = models["sharp"]
    lens = [1730, 45, 237]
    feats, flens = audio_inputs(lens, seed=4)
    T = max(lens)
    batch = torch.zeros(len(lens), 128, T)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    start = 0
    for i, n in enumerate(lens):
        batch[i, :, :n] = feats[:, start:start + n]
        mask[i, :n] = 1
        start += n
    with torch.no_grad():
        a = ours(batch, feature_attention_mask=mask)
        b = ours(feats, flens)
        c = ref(feats, flens).last_hidden_state
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() <= TOL


def test_audio_output_lengths_match_hf():
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    from omni_model.model.audio import audio_output_lengths

    lens = torch.arange(1, 5000)
    assert torch.equal(audio_output_lengths(lens), _get_feat_extract_output_lengths(lens))
    assert audio_output_lengths(100) == 13 and audio_output_lengths(237) == 31


def test_audio_parity_is_sensitive(models, monkeypatch):
    """Negative control: attention over a whole clip instead of 104-token windows is far outside the tolerance."""
    from omni_model.model.audio import AudioEncoder

    ours, ref = models["sharp"]
    feats, lens = audio_inputs(CASES["long_and_short"])
    monkeypatch.setattr(AudioEncoder, "window_tokens", property(lambda self: 10**6))
    with torch.no_grad():
        wrong = ours(feats, lens)
        expect = ref(feats, lens).last_hidden_state
    assert (wrong - expect).abs().max().item() > 1e-2


def test_audio_grads_match_hf(tiny_hf_dir, models):
    cfg = hf_config_dict(tiny_hf_dir)
    ours, ref = models["sharp"]
    feats, lens = audio_inputs([1000, 237], seed=9)
    for m in (ours, ref):
        m.zero_grad(set_to_none=True)
    w = None
    for m, out in ((ref, lambda: ref(feats, lens).last_hidden_state), (ours, lambda: ours(feats, lens))):
        y = out()
        if w is None:
            w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        (w * y).sum().backward()
    expect = {k[len("audio_model."):]: v for k, v in hf_grads_as_mcore(ref, "thinker.audio_tower.", cfg).items()
              if k.startswith("audio_model.")}
    worst = 0.0
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        worst = max(worst, (p.grad - expect[name]).abs().max().item() / (expect[name].abs().max().item() + 1e-6))
    print(f"audio grads: worst relative max error {worst:.2e}")
    assert worst < 1e-4
    for m in (ours, ref):
        m.zero_grad(set_to_none=True)


def test_audio_rows_round_trip(tiny_hf_dir, weights, models):
    """mcore state dict -> HF through the rows reproduces every HF audio tensor bit for bit."""
    assert_rows_round_trip(models["raw"][0], "audio_model.", "thinker.audio_tower.", weights["raw"],
                           hf_config_dict(tiny_hf_dir))


def _bf16_audio(tiny_hf_dir, tensors, device):
    from omni_model.model.audio import AudioEncoder, audio_transformer_config

    cfg = hf_config_dict(tiny_hf_dir)
    model = AudioEncoder(cfg, audio_transformer_config(cfg, params_dtype=torch.bfloat16)).eval()
    load_tower(model, tensors, cfg, "audio_model.")
    return model.to(device)


def test_audio_bf16_close_to_fp32(tiny_hf_dir, weights, models):
    _, ref = models["sharp"]
    model = _bf16_audio(tiny_hf_dir, weights["sharp"], "cpu")
    feats, lens = audio_inputs(CASES["long_and_short"])
    with torch.no_grad():
        got = model(feats, lens)
        expect = ref(feats, lens).last_hidden_state
    assert got.dtype == torch.bfloat16
    rel = (got.float() - expect).abs().max().item() / expect.abs().max().item()
    assert rel < 5e-2, rel


@pytest.mark.gpu
def test_audio_cuda_bf16_matches_hf(tiny_hf_dir, weights, models):
    _, ref = models["sharp"]
    model = _bf16_audio(tiny_hf_dir, weights["sharp"], "cuda")
    feats, lens = audio_inputs(CASES["long_and_short"])
    with torch.no_grad():
        got = model(feats.cuda(), lens)
        expect = ref(feats, lens).last_hidden_state
    rel = (got.float().cpu() - expect).abs().max().item() / expect.abs().max().item()
    print(f"cuda bf16 audio rel err {rel:.3g}")
    assert rel < 5e-2, rel
