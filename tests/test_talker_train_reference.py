"""Our talker training step is transformers' (CPU, fp32, tiny Qwen3-Omni with sharpened talker weights).

STEPS optimizer steps of 2 micro-batches each on the same synthetic batches (talker_helpers.talker_batch: inputs as
`generate` builds them, teacher-forced codes ending in codec EOS):

* ours: omni_model.train.talker_step (the loss `talker_loss`, mcore's `forward_step_func` TalkerForwardStep) through
  the production step: `build_talker_training` (mcore DDP, `get_megatron_optimizer` Adam with decoupled weight decay
  and its no-decay group, `OptimizerParamScheduler`) and `train.loop.optimizer_step` (mcore's schedule,
  finalize_model_grads, clipping, the scheduler step), the finetune stage's own functions;
* transformers: a plain loop over `Qwen3OmniMoeTalkerForConditionalGeneration`: its forward with `labels` gives the
  first group's loss (its own ForCausalLMLoss, called as the forward calls it: the forward's `labels` path fails in
  transformers 5.24, see _transformers_loss); the code predictor's forward, called step by step as `generate` calls
  it, gives groups 1..15 (cross-entropy mean over frames x groups); loss = first + PREDICTOR_WEIGHT x predictor,
  each micro-batch's loss / 2 backpropagated, `clip_grad_norm_`, `torch.optim.AdamW` with the LR of the schedule
  written out (train_helpers.scheduled_lr).

MoE aux loss off on both sides (transformers' talker adds none: `output_router_logits` is false in its config).
Per-step losses agree to 1e-5, final weights (every talker tensor, HF names through the mapping) to 1e-5 relative.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from llm_helpers import config_of, sharpened_checkpoint
from talker_helpers import hf_inputs_embeds, hf_labels, hf_residual_logits, hf_talker, talker_batch
from train_helpers import scheduled_lr

warnings.filterwarnings("ignore")

STEPS = 10
MICRO_BATCHES = 2
PREDICTOR_WEIGHT = 0.3
TRAIN = dict(lr=2e-3, min_lr=2e-4, lr_warmup_iters=2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
             adam_eps=1e-8, clip_grad=1.0)
LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-5


def lr_at(step: int) -> float:
    return scheduled_lr(step + 1, dict(TRAIN, iters=STEPS))


def batches_of(config: dict, step: int) -> list:
    """Two sets of micro-batches, alternating: every second step sees the same codes again, so training shows."""
    return [talker_batch(config, b=2, s=16, seed=100 * (step % 2) + m) for m in range(MICRO_BATCHES)]


def _ours(hf_dir, train_dir):
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    from omni_model.convert.mapping import load_hf_into_talker
    from omni_model.train.build import init_training_parallel
    from omni_model.train.settings import TrainSettings
    from omni_model.train.talker_step import build_talker_training

    settings = TrainSettings(
        hf_dir=str(hf_dir), init_checkpoint="", shards="", train_dir=str(train_dir),
        train=dict(TRAIN, iters=STEPS, lr_decay_style="cosine", micro_batch_size=1, global_batch_size=MICRO_BATCHES,
                   moe_aux_loss_coeff=0.0, seed=1234))
    init_training_parallel(settings)
    assert get_num_microbatches() == MICRO_BATCHES
    return build_talker_training(settings, load_weights=lambda talker: load_hf_into_talker(talker, hf_dir))


def _transformers(hf_dir):
    whole, talker = hf_talker(hf_dir, whole_model=True)
    talker.train()
    params = dict(talker.named_parameters())
    groups = [{"params": [p for p in params.values() if p.ndim > 1], "weight_decay": TRAIN["weight_decay"]},
              {"params": [p for p in params.values() if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(TRAIN["adam_beta1"], TRAIN["adam_beta2"]),
                                  eps=TRAIN["adam_eps"])
    return whole, talker, optimizer


def _transformers_loss(talker, batch) -> torch.Tensor:
    embeds = hf_inputs_embeds(talker, batch)
    logits = talker(inputs_embeds=embeds, position_ids=batch.position_ids, use_cache=False).logits
    # the loss its forward computes with `labels`, called directly: in transformers 5.24 that forward reads
    # `self.config.vocab_size`, which Qwen3OmniMoeTalkerConfig does not have (AttributeError); the talker's vocabulary
    # is its text_config's
    first = talker.loss_function(logits=logits, labels=hf_labels(batch), vocab_size=talker.config.text_config.vocab_size)
    hidden = talker.model(inputs_embeds=embeds, position_ids=batch.position_ids, use_cache=False).last_hidden_state
    rows = hidden.reshape(-1, hidden.shape[-1])[batch.frame_positions]
    residual = hf_residual_logits(talker, rows, batch.frame_codes)  # [G-1, N, V]
    predictor = F.cross_entropy(residual.flatten(0, 1), batch.frame_codes[:, 1:].transpose(0, 1).flatten())
    return first + PREDICTOR_WEIGHT * predictor


def _transformers_step(talker, optimizer, batches, step) -> float:
    total = 0.0
    for batch in batches:
        loss = _transformers_loss(talker, batch) / len(batches)
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(talker.parameters(), TRAIN["clip_grad"])
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def _hf_weights(whole, out_dir) -> dict:
    """transformers' talker parameters under the on-disk names: the whole model holding the trained talker, saved by
    transformers itself (which turns its fused in-memory experts back into the checkpoint's per-expert tensors)."""
    from safetensors.torch import load_file

    whole.save_pretrained(out_dir)
    tensors = {}
    for path in sorted(out_dir.glob("*.safetensors")):
        tensors.update({name: t for name, t in load_file(path).items() if name.startswith("talker.")})
    return tensors


def _our_weights(model, hf_dir) -> dict:
    from omni_model.convert.mapping import SafetensorsReader, current_coord, talker_mapper
    from omni_model.model.language_model import current_layout

    state = {f"talker.{k}": v for k, v in model.module.state_dict().items() if not k.endswith("_extra_state")}
    mapper = talker_mapper(SafetensorsReader(hf_dir).config, current_layout())
    return {k: v.clone() for k, v in mapper.iter_mcore_to_hf({current_coord(): state})}


@pytest.fixture(scope="module")
def sharp_dir(tiny_hf_dir, tmp_path_factory):
    return sharpened_checkpoint(tiny_hf_dir, tmp_path_factory.mktemp("sharp_talker_train") / "hf", parts=("talker.",))


def test_talker_training_matches_transformers(sharp_dir, tmp_path):
    from omni_model.train.loop import optimizer_step
    from omni_model.train.talker_step import TalkerForwardStep

    config = config_of(sharp_dir)
    training = _ours(sharp_dir, tmp_path / "train")
    whole, ref, ref_optimizer = _transformers(sharp_dir)
    initial = _our_weights(training.model, sharp_dir)
    forward_step = TalkerForwardStep(PREDICTOR_WEIGHT)
    losses, worst_loss = [], 0.0
    for step in range(STEPS):
        batches = batches_of(config, step)
        assert training.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(step), rel=1e-12, abs=1e-15)
        reports, updated, grad_norm = optimizer_step(
            training.model, training.optimizer, training.scheduler, forward_step, iter(batches), MICRO_BATCHES,
            seq_length=16, micro_batch_size=2)
        ours = sum(r["lm loss"][0].item() for r in reports) / MICRO_BATCHES
        theirs = _transformers_step(ref, ref_optimizer, batches, step)
        losses.append((ours, theirs))
        worst_loss = max(worst_loss, abs(ours - theirs))
        print(f"step {step}: lr {lr_at(step):.2e} loss ours {ours:.7f} transformers {theirs:.7f} "
              f"diff {abs(ours - theirs):.1e} grad norm {float(grad_norm):.3f}")
        assert updated
    assert losses[-2][0] < losses[0][0] and losses[-1][0] < losses[1][0]  # it trains (same batches, later step)

    final = _our_weights(training.model, sharp_dir)
    reference = _hf_weights(whole, tmp_path / "transformers")
    assert set(final) == set(reference), sorted(set(final) ^ set(reference))[:5]
    worst_name, worst, moved = None, 0.0, 0
    for name, weight in final.items():
        expected = reference[name]
        error = ((weight - expected).norm() / expected.norm().clamp_min(1e-12)).item()
        moved += not torch.equal(weight, initial[name])
        if error >= worst:
            worst_name, worst = name, error
    print(f"per-step loss max abs diff {worst_loss:.1e}; final weights worst relative error {worst:.1e} "
          f"({worst_name}); {moved}/{len(final)} tensors changed by training")
    assert worst_loss <= LOSS_TOL
    assert worst <= WEIGHT_TOL, worst_name
    assert moved == len(final)
