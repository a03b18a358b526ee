"""What a training step reports beyond the loss (omni_model.train.metrics), checked against values computed another way.

* The towers' model FLOPs for known grids / clip lengths equal the hand formula written out with the tiny model's
  sizes, and their matrix products equal what torch's FlopCounterMode counts on the real towers' forward (it does not
  see the CPU attention kernel: that term is the hand formula's).
* One step of the training loop (`loop.step`: mcore schedule, 2 micro-batches, aux coefficient on) reports as
  `moe_aux_loss` the Switch load-balancing loss recomputed from the routers' logits of that step (non-padding tokens,
  mean over micro-batches and MoE layers), as `flops_vision` / `flops_audio` the FlopCounter's value of the
  batches' own grids and clips, and as `skipped_samples` the task encoder's skips the batches carry.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from train_helpers import encode_demo_samples, packed_micro_batches, switch_stats

# the tiny model's tower sizes (omni_model.configs.tiny_config), written out for the hand formulas
D_V, F_V, DEPTH, PATCH_DIM, MERGED, OUT = 32, 64, 4, 3 * 2 * 16 * 16, 32 * 2 * 2, 64
MERGERS = 1 + 3  # the final merger + 3 deepstack mergers
D_A, F_A, LAYERS_A, DS, OUT_A = 32, 64, 2, 16, 64


def vision_macs_by_hand(t: int, h: int, w: int) -> int:
    n = t * h * w
    layer = n * (4 * D_V * D_V + 2 * D_V * F_V) + 2 * t * (h * w) ** 2 * D_V  # + attention in each frame
    return n * PATCH_DIM * D_V + DEPTH * layer + MERGERS * (n // 4) * (MERGED * MERGED + MERGED * OUT)


def audio_macs_250_frames_by_hand() -> int:
    """250 mel frames = chunks of 100, 100, 50 frames; 128 mel bins -> 64 -> 32 -> 16; time 100 -> 50 -> 25 -> 13
    and 50 -> 25 -> 13 -> 7: 33 tokens, one attention window (104 tokens)."""
    def chunk(t1, t2, t3):
        return 9 * DS * 64 * t1 + 9 * DS * DS * 32 * t2 + 9 * DS * DS * 16 * t3 + t3 * DS * 16 * D_A

    tokens = 13 + 13 + 7
    convs = 2 * chunk(50, 25, 13) + chunk(25, 13, 7)
    layers = LAYERS_A * (tokens * (4 * D_A * D_A + 2 * D_A * F_A) + 2 * tokens * tokens * D_A)
    return convs + layers + tokens * (D_A * D_A + D_A * OUT_A)


def test_tower_flops_equal_the_hand_formula(tiny_hf_dir):
    from omni_model.train.metrics import FlopCounter

    seen = {"seq_lens": [], "vision_grids": [(1, 4, 6), (2, 4, 4)], "audio_frames": [250]}
    flops = FlopCounter(tiny_hf_dir)(seen)
    vision = 6 * (vision_macs_by_hand(1, 4, 6) + vision_macs_by_hand(2, 4, 4))  # trained: forward + both gradients
    audio = 6 * audio_macs_250_frames_by_hand()
    print(f"vision {flops['vision']:.0f} (hand {vision}), audio {flops['audio']:.0f} (hand {audio})")
    assert flops == {"llm": 0.0, "vision": float(vision), "audio": float(audio)}
    frozen = FlopCounter(tiny_hf_dir, {"freeze_vision": True, "freeze_audio": True})(seen)
    assert (frozen["vision"], frozen["audio"]) == (vision / 3, audio / 3)  # forward only


def test_lora_flops_leave_out_the_frozen_bases_weight_gradients(tiny_hf_dir):
    """train.lora trains adapters only: the LLM costs forward + input gradients (4 of full SFT's 6 FLOPs per MAC), a
    tower without adapters its forward, a tower with adapters forward + input gradients."""
    from omni_model.train.metrics import FlopCounter

    seen = {"seq_lens": [100, 60], "vision_grids": [(1, 4, 6)], "audio_frames": [250]}
    counter = FlopCounter(tiny_hf_dir)
    full = counter(seen)
    lora = FlopCounter(tiny_hf_dir, {"lora": {"enabled": True, "targets": ["attention", "experts", "audio"]}})(seen)
    # the weights' gradients (2 FLOPs per MAC of the active parameters) go; attention has no weights and stays
    assert full["llm"] - lora["llm"] == 2 * counter.active * 160 > 0
    assert (lora["vision"], lora["audio"]) == (full["vision"] / 3, full["audio"] * 4 / 6)
    off = FlopCounter(tiny_hf_dir, {"lora": {"enabled": False, "targets": ["attention"]}})(seen)
    assert off == full


def test_tower_matmuls_equal_torch_flop_counter(tiny_hf_dir):
    """FlopCounterMode over the real towers' forward: every matmul / conv (not the CPU attention kernel) == ours.
    Audio of 200 frames (two full chunks): with a partial chunk the towers also convolve the padding of it, which
    model FLOPs leave out."""
    from torch.utils.flop_counter import FlopCounterMode

    from omni_model.model.audio import AudioEncoder
    from omni_model.model.vision import VisionEncoder
    from omni_model.runtime.parallel import init_parallel
    from omni_model.train.metrics import FlopCounter

    init_parallel(seed=1234)
    counter = FlopCounter(tiny_hf_dir)
    vision = VisionEncoder(tiny_hf_dir)
    for t, h, w in [(1, 4, 6), (2, 4, 4)]:
        with FlopCounterMode(display=False) as mode:
            vision(torch.randn(t * h * w, PATCH_DIM), torch.tensor([[t, h, w]]))
        attention = DEPTH * 2 * t * (h * w) ** 2 * D_V
        assert 2 * counter.vision_macs((t, h, w)) == mode.get_total_flops() + 2 * attention, (t, h, w)
    audio = AudioEncoder(tiny_hf_dir)
    with FlopCounterMode(display=False) as mode:
        audio(torch.randn(1, 128, 200), feature_lens=[200])
    attention = LAYERS_A * 2 * 26 * 26 * D_A
    assert 2 * counter.audio_macs(200) == mode.get_total_flops() + 2 * attention


@pytest.fixture
def step_batches(tiny_hf_dir, tmp_path):
    """Two packed micro-batches (image + audio + text; video), padded: pads must leave the aux loss."""
    batches = packed_micro_batches(encode_demo_samples(tiny_hf_dir, tmp_path / "demo"),
                                   [["image_audio", "text"], ["video"]], pad_to_multiple=16)
    assert all((b.attention_mask == 0).any() for b in batches)
    return batches


def test_step_reports_the_aux_loss_tower_flops_and_skips_of_its_batches(tiny_hf_dir, tmp_path, step_batches):
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.transformer_config import text_config_of
    from omni_model.train.build import build_training, init_training_parallel
    from omni_model.train.data import TokenCounter
    from omni_model.train.forward_step import forward_step
    from omni_model.train.loop import Run, step
    from omni_model.train.metrics import FlopCounter
    from omni_model.train.settings import TrainSettings

    warnings.filterwarnings("ignore")
    settings = TrainSettings(hf_dir=str(tiny_hf_dir), init_checkpoint="", shards="", train_dir=str(tmp_path / "t"),
                             train=dict(iters=2, lr_warmup_iters=1, micro_batch_size=1, global_batch_size=2,
                                        moe_aux_loss_coeff=0.01, seed=1234))
    init_training_parallel(settings)
    training = build_training(settings, load_initial_weights=False)
    load_hf_into_model(training.thinker, tiny_hf_dir, prefix="")
    routers = [layer.mlp.router for layer in training.thinker.language_model.decoder.layers]
    logits = []  # per micro-batch, per layer: [tokens, experts] in token order
    for router in routers:
        def gating(hidden, _gating=router.gating):
            out = _gating(hidden)
            logits.append(out.detach().transpose(0, 1).reshape(-1, out.shape[-1]))
            return out
        router.gating = gating

    # the task encoder's skips since each worker's previous batch, as OmniBatch.skipped carries them
    step_batches[0].skipped = {"over_long": 2, "decode": 0, "encode": 1}
    step_batches[1].skipped = {"over_long": 0, "decode": 4, "encode": 0}
    run = Run(settings=settings, training=training, forward_step=forward_step, digest="", loader=None,
              batches=TokenCounter(iter(step_batches)), evaluation=[], flops=FlopCounter(tiny_hf_dir),
              peak=None, log=None)
    record = step(run, 1)

    text = text_config_of(tiny_hf_dir)
    num_experts, k, num_layers = text["num_experts"], text["num_experts_per_tok"], len(routers)
    assert len(logits) == len(step_batches) * num_layers
    per_layer = []
    for m, batch in enumerate(step_batches):
        keep = batch.attention_mask.reshape(-1).bool()
        for layer in range(num_layers):
            f, p = switch_stats(logits[m * num_layers + layer], keep, k)
            per_layer.append(num_experts * (f * p).sum())
    expected = torch.stack(per_layer).mean().item()  # mean over micro-batches and MoE layers (all 4 are MoE)
    print(f"moe_aux_loss {record['moe_aux_loss']!r}, recomputed from the routers' logits {expected!r}")
    assert record["moe_aux_loss"] == pytest.approx(expected, rel=1e-6)

    counter = FlopCounter(tiny_hf_dir)
    grids = [tuple(g) for b in step_batches for grid in (b.image_grid_thw, b.video_grid_thw) if grid is not None
             for g in grid.tolist()]
    clips = [int(n) for b in step_batches if b.audio_feature_lengths is not None
             for n in b.audio_feature_lengths.tolist()]
    assert grids and clips  # the step saw an image, a video and an audio clip
    assert record["flops_vision"] == 6 * sum(counter.vision_macs(g) for g in grids)
    assert record["flops_audio"] == 6 * sum(counter.audio_macs(n) for n in clips)
    assert record["flops_llm"] == counter.llm([n for b in step_batches for n in _lengths(b)])
    total = record["flops_llm"] + record["flops_vision"] + record["flops_audio"]
    assert record["tflops"] == pytest.approx(total / record["step_s"] / 1e12, rel=1e-12)
    assert record["skipped_samples"] == 2 + 1 + 4  # one data-parallel rank: its own skips


def _lengths(batch) -> list:
    from omni_model.train.data import _sequence_lengths

    return _sequence_lengths(batch)
