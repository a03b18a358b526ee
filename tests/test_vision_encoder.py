"""Vision encoder (Qwen3-VL ViT + merger + deepstack mergers) vs transformers' Qwen3OmniMoeVisionEncoder.

CPU, fp32, the tiny checkpoint's weights loaded through the production Mapper (so the rows and the "qkv_fused" transform
are tested too). The raw tiny weights (std 0.02) make the tower almost input-independent, so every parity case is also
run with `sharpen()`-ed weights (O(1) activations, peaked attention). Measured max abs errors (fp32, 2-core CPU):
raw ~1e-7, sharpened ~1.2e-5 at output magnitude ~6 (relative ~2e-6; patch-embed GEMM vs conv3d and
pos-embed interpolation rounding).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from encoder_parity_utils import (
    assert_rows_round_trip,
    hf_config_dict,
    hf_grads_as_mcore,
    load_tower,
    hf_vision_reference,
    load_hf_encoder_tensors,
    sharpen,
    vision_inputs,
)

REPO = Path(__file__).resolve().parents[1]

GRIDS = {
    "one_image": [[1, 4, 6]],
    "two_images": [[1, 4, 6], [1, 8, 4]],
    "video_t3": [[3, 4, 4]],
    "video_and_image": [[2, 6, 8], [1, 2, 2]],
}
TOL = {"raw": 1e-5, "sharp": 1e-4}


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
    from omni_model.model.vision import VisionEncoder

    cfg = hf_config_dict(tiny_hf_dir)
    out = {}
    for kind, tensors in weights.items():
        ours = VisionEncoder(cfg).eval()
        load_tower(ours, tensors, cfg, "vision_model.")
        out[kind] = (ours, hf_vision_reference(tiny_hf_dir, tensors))
    return out


@pytest.mark.parametrize("kind", ["raw", "sharp"])
@pytest.mark.parametrize("case", list(GRIDS))
def test_vision_matches_hf(models, kind, case):
    ours, ref = models[kind]
    pixels, grid = vision_inputs(GRIDS[case])
    with torch.no_grad():
        expect = ref(pixels, grid)
        embeds, deepstack = ours(pixels, grid)
    n_merged = int(grid.prod(-1).sum()) // 4
    assert embeds.shape == (n_merged, 64)
    assert len(deepstack) == len(expect.deepstack_features) == 3
    errs = [(embeds - expect.pooler_output).abs().max().item()]
    errs += [(a - b).abs().max().item() for a, b in zip(deepstack, expect.deepstack_features)]
    print(f"vision {kind} {case}: max abs err embeds/deepstack = {errs}, |out| max {expect.pooler_output.abs().max():.3g}")
    assert max(errs) <= TOL[kind], errs


def test_vision_segments_are_block_diagonal(models):
    """Two images in one call == each alone (attention never crosses images/frames)."""
    ours, _ = models["sharp"]
    a_px, a_grid = vision_inputs([[1, 4, 6]], seed=1)
    b_px, b_grid = vision_inputs([[2, 8, 4]], seed=2)
    with torch.no_grad():
        joint, joint_ds = ours(torch.cat([a_px, b_px]), torch.cat([a_grid, b_grid]))
        a, a_ds = ours(a_px, a_grid)
        b, b_ds = ours(b_px, b_grid)
    assert torch.allclose(joint, torch.cat([a, b]), atol=1e-5, rtol=0)
    for j, x, y in zip(joint_ds, a_ds, b_ds):
        assert torch.allclose(j, torch.cat([x, y]), atol=1e-5, rtol=0)


def test_vision_parity_is_sensitive(models, monkeypatch):
    """Negative control: one attention segment over both images (wrong) is far outside the tolerance."""
    import omni_model.model.vision as vision

    ours, ref = models["sharp"]
    pixels, grid = vision_inputs(GRIDS["two_images"])
    total = int(grid.prod(-1).sum())
    monkeypatch.setattr(vision, "vision_cu_seqlens", lambda g: (torch.tensor([0, total], dtype=torch.int32), total))
    with torch.no_grad():
        wrong, _ = ours(pixels, grid)
        expect = ref(pixels, grid).pooler_output
    assert (wrong - expect).abs().max().item() > 100 * TOL["sharp"]


def test_vision_grads_match_hf(tiny_hf_dir, models):
    """Backward: every parameter gradient equals HF's, mapped through the same rows."""
    cfg = hf_config_dict(tiny_hf_dir)
    ours, ref = models["sharp"]
    pixels, grid = vision_inputs(GRIDS["video_and_image"], seed=3)
    g = torch.Generator().manual_seed(7)
    for m in (ours, ref):
        m.zero_grad(set_to_none=True)
    out = ref(pixels, grid)
    weights = [torch.randn(out.pooler_output.shape, generator=g) for _ in range(4)]
    loss_ref = sum((w * t).sum() for w, t in zip(weights, [out.pooler_output, *out.deepstack_features]))
    loss_ref.backward()
    embeds, deepstack = ours(pixels, grid)
    sum((w * t).sum() for w, t in zip(weights, [embeds, *deepstack])).backward()
    expect = {k[len("vision_model."):]: v for k, v in hf_grads_as_mcore(ref, "thinker.visual.", cfg).items()
              if k.startswith("vision_model.")}
    worst = 0.0
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        err = (p.grad - expect[name]).abs().max().item() / (expect[name].abs().max().item() + 1e-6)
        worst = max(worst, err)
    print(f"vision grads: worst relative max error {worst:.2e}")
    assert worst < 1e-4
    for m in (ours, ref):
        m.zero_grad(set_to_none=True)


def test_vision_rows_round_trip(tiny_hf_dir, weights, models):
    """mcore state dict -> HF through the rows reproduces every HF vision tensor bit for bit."""
    assert_rows_round_trip(models["raw"][0], "vision_model.", "thinker.visual.", weights["raw"], hf_config_dict(tiny_hf_dir))


@pytest.mark.slow
def test_encoders_tp2_torchrun(tiny_hf_dir, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): TP=2 vision + audio (split and replicated) reproduce HF forward and
    backward (gradient shards == HF gradients mapped + split by the rows), and a dist_checkpointing save/load of
    the TP=2 towers (replicated audio included) restores them bit for bit."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "tests"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "encoder_tp_worker.py"), str(tiny_hf_dir), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "TP2 OK" in proc.stdout


def _bf16_vision(tiny_hf_dir, tensors, device):
    from omni_model.model.vision import VisionEncoder, vision_transformer_config

    cfg = hf_config_dict(tiny_hf_dir)
    model = VisionEncoder(cfg, vision_transformer_config(cfg, params_dtype=torch.bfloat16)).eval()
    load_tower(model, tensors, cfg, "vision_model.")
    return model.to(device)


def test_vision_bf16_close_to_fp32(tiny_hf_dir, weights, models):
    """bf16 parameters (the GPU training dtype) run and stay within bf16 rounding of the fp32 reference."""
    _, ref = models["sharp"]
    model = _bf16_vision(tiny_hf_dir, weights["sharp"], "cpu")
    pixels, grid = vision_inputs(GRIDS["video_and_image"])
    with torch.no_grad():
        embeds, deepstack = model(pixels, grid)
        expect = ref(pixels, grid)
    assert embeds.dtype == torch.bfloat16
    for a, b in zip([embeds, *deepstack], [expect.pooler_output, *expect.deepstack_features]):
        rel = (a.float() - b).abs().max().item() / b.abs().max().item()
        assert rel < 5e-2, rel


@pytest.mark.gpu
def test_vision_cuda_bf16_varlen_matches_hf(tiny_hf_dir, weights, models):
    """On CUDA: the bf16 tower (flash varlen attention) vs the fp32 HF reference, and varlen vs per-segment SDPA."""
    from omni_model.model import attention
    from omni_model.model.options import PerfOptions, apply_options

    assert attention.varlen_applies(torch.zeros(1, device="cuda", dtype=torch.bfloat16))
    _, ref = models["sharp"]
    model = _bf16_vision(tiny_hf_dir, weights["sharp"], "cuda")
    pixels, grid = vision_inputs(GRIDS["video_and_image"])
    with torch.no_grad():
        embeds, deepstack = model(pixels.cuda(), grid)
        apply_options(model, PerfOptions(packed_kernel="loop"))
        loop_embeds, _ = model(pixels.cuda(), grid)
        expect = ref(pixels, grid)
    for a, b in zip([embeds, *deepstack], [expect.pooler_output, *expect.deepstack_features]):
        rel = (a.float().cpu() - b).abs().max().item() / b.abs().max().item()
        print(f"cuda bf16 vision rel err {rel:.3g}")
        assert rel < 5e-2, rel
    assert (embeds.float() - loop_embeds.float()).abs().max().item() / embeds.float().abs().max().item() < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_tables_give_mcores_rope_bit_for_bit(tiny_hf_dir, weights, parallel, dtype):
    """PerfOptions.tower_rope_tables (rope.RotaryTables: cos and signed sin made once per forward, 4
    kernels per query/key) against mcore's apply_rotary_pos_emb in every layer: the same embeddings, deepstack
    features and input gradients, bit for bit, in fp32 and in bf16 (the training dtype)."""
    from omni_model.model.rope import RotaryTables, RotaryTableSelfAttention
    from omni_model.model.vision import VisionEncoder, vision_transformer_config

    cfg = hf_config_dict(tiny_hf_dir)
    model = VisionEncoder(cfg, vision_transformer_config(cfg, params_dtype=dtype)).eval()
    load_tower(model, weights["sharp"], cfg, "vision_model.")
    attention = model.decoder.layers[0].self_attention
    assert isinstance(attention, RotaryTableSelfAttention)
    pixels, grid = vision_inputs(GRIDS["video_and_image"])
    used = []
    real_apply = RotaryTables.apply

    def apply(tables, x):
        used.append(x.shape)
        return real_apply(tables, x)

    outputs = {}
    for tables in (True, False):
        model.rope_tables = tables
        x = pixels.to(dtype).requires_grad_()
        RotaryTables.apply = apply
        try:
            embeds, deepstack = model(x, grid)
        finally:
            RotaryTables.apply = real_apply
        (embeds.float().sum() + sum(d.float().pow(2).sum() for d in deepstack)).backward()
        outputs[tables] = [embeds, *deepstack, x.grad]
    assert len(used) == 2 * len(model.decoder.layers)  # query and key of every layer, with the tables only
    for ours, mcores in zip(outputs[True], outputs[False]):
        assert torch.equal(ours, mcores)


def test_patch_layout_equals_transformers_for_ragged_grids():
    """The pos-embed taps and weights of a micro-batch's many images and video frames (sizes 2..60 patches a side,
    t up to 8), computed for all items at once, equal transformers' own helper bit for bit; the RoPE positions
    equal each frame's (row, col) grid permuted into merge-block order, built per item."""
    import random

    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    from omni_model.model.vision import patch_layout

    rng = random.Random(0)
    grid = torch.tensor([(rng.choice([1, 1, 2, 8]), 2 * rng.randint(1, 30), 2 * rng.randint(1, 30))
                         for _ in range(40)])
    positions, indices, weights = patch_layout(grid, 48, 2)
    expect = get_vision_interpolation_indices_and_weights(grid, 48, mode="bilinear", align_corners=True,
                                                          spatial_merge_size=2)
    assert torch.equal(indices, expect[0]) and torch.equal(weights, expect[1])

    per_item = []
    for t, h, w in grid.tolist():
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        frame = torch.stack([rows, cols], -1).reshape(h // 2, 2, w // 2, 2, 2).permute(0, 2, 1, 3, 4).reshape(-1, 2)
        per_item.append(frame.repeat(t, 1))
    assert torch.equal(positions, torch.cat(per_item))
