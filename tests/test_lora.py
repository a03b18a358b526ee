"""LoRA training (`train.lora`) is transformers + peft's LoRA training (CPU, fp32, tiny Qwen3-Omni).

`test_lora_training_matches_peft`: STEPS optimizer steps of 2 micro-batches each through the finetune stage's own
`build_training` with train.lora (adapters on the LLM attention q/k/v/o and on every routed expert's fc1/fc2, the
base frozen) and through a plain loop on transformers' thinker wrapped by `peft.get_peft_model` (q/k/v/o_proj
modules + the experts' fused gate_up_proj/down_proj through `target_parameters`), `torch.optim.AdamW`, the same
clipping and LR schedule, the same batches (test_train_reference's). The PEFT adapters start from ours (our init is
PEFT's: A kaiming-uniform, B zero; copied through `to_peft`, the export's own conversion). Per-step losses agree to
1e-5, the final adapters to 1e-5 relative, and the frozen base weights are bit-identical to what they were.
"""

from __future__ import annotations

import json

import pytest
import torch

from llm_helpers import hf_thinker
from test_train_reference import STEPS, _micro_batches, _transformers_step, lr_at, samples  # noqa: F401
from test_train_reference import TRAIN as FULL_TRAIN
from train_helpers import train_step

# the full-training reference's settings at Adam eps 1e-8 (its 1e-6 is for the gradient-free tensors of a full
# model; the adapters have none, and their tolerances below were measured at 1e-8: 1.5e-6 loss, ~1e-5 weights)
TRAIN = dict(FULL_TRAIN, adam_eps=1e-8)

LORA = dict(enabled=True, rank=4, alpha=8.0, dropout=0.0, targets=["attention", "experts"])
LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-5


def _ours(hf_dir, train_dir, lora=LORA):
    """build_training with train.lora; the base weights from the tiny HF checkpoint through the mapping."""
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.train.build import build_training, init_training_parallel
    from omni_model.train.settings import TrainSettings

    settings = TrainSettings(
        hf_dir=str(hf_dir), init_checkpoint="", shards="", train_dir=str(train_dir),
        train=dict(TRAIN, iters=STEPS, lr_decay_style="cosine", micro_batch_size=1, global_batch_size=2,
                   moe_aux_loss_coeff=0.0, seed=1234, lora=lora))
    init_training_parallel(settings)
    assert get_num_microbatches() == 2
    return settings, build_training(settings, load_base=lambda thinker: load_hf_into_model(thinker, hf_dir, prefix=""))


def our_adapters(thinker) -> dict:
    from omni_model.model.lora import adapter_parameters

    return {key: param.detach().clone() for key, param, _ in adapter_parameters(thinker)}


def peft_thinker(hf_dir, adapters: dict, spec):
    """transformers' thinker with PEFT LoRA holding `adapters` (ours, full tensors), in training mode."""
    from peft import get_peft_model, set_peft_model_state_dict

    from omni_model.model.lora import to_peft

    model = hf_thinker(hf_dir)
    model.config.text_config.output_router_logits = False
    state, config = to_peft(adapters, spec, module_prefix="model.")
    model = get_peft_model(model, config)
    result = set_peft_model_state_dict(model, state)
    assert not result.unexpected_keys, result.unexpected_keys[:5]
    return model.train()


def peft_adapters(model) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_lora_training_matches_peft(tiny_hf_dir, samples, tmp_path):  # noqa: F811
    from omni_model.model.lora import to_peft

    pool, pad_id = samples
    settings, training = _ours(tiny_hf_dir, tmp_path / "train")
    thinker = training.thinker
    trainable = [n for n, p in thinker.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    base_before = {n: p.detach().clone() for n, p in thinker.named_parameters() if not p.requires_grad}
    start = our_adapters(thinker)
    ref = peft_thinker(tiny_hf_dir, start, settings.lora)
    params = [p for p in ref.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == sum(t.numel() for t in start.values())
    ref_optimizer = torch.optim.AdamW([{"params": params, "weight_decay": TRAIN["weight_decay"]}], lr=0.0,
                                      betas=(TRAIN["adam_beta1"], TRAIN["adam_beta2"]), eps=TRAIN["adam_eps"])
    worst_loss, losses = 0.0, []
    for step in range(STEPS):
        our_batches, their_batches = _micro_batches(pool, pad_id, step)
        result = train_step(training.model, training.optimizer, training.scheduler, our_batches)
        their_loss = _transformers_step(ref, ref_optimizer, their_batches, step)
        losses.append(result["loss"])
        worst_loss = max(worst_loss, abs(result["loss"] - their_loss))
        print(f"step {step}: lr {lr_at(step):.2e} loss ours {result['loss']:.7f} peft {their_loss:.7f} "
              f"diff {abs(result['loss'] - their_loss):.1e}")
    assert losses[-1] < losses[0]  # it trains

    final, _ = to_peft(our_adapters(thinker), settings.lora, module_prefix="model.")
    reference = peft_adapters(ref)
    assert set(final) == set(reference), sorted(set(final) ^ set(reference))[:5]
    worst_name, worst = None, 0.0
    for name, weight in final.items():
        error = ((weight - reference[name]).norm() / reference[name].norm().clamp_min(1e-12)).item()
        if error >= worst:
            worst_name, worst = name, error
    moved = sum(not torch.equal(v, start[k]) for k, v in our_adapters(thinker).items())
    print(f"per-step loss max abs diff {worst_loss:.1e}; final adapters worst relative error {worst:.1e} "
          f"({worst_name}); {moved}/{len(start)} adapter tensors changed")
    assert worst_loss <= LOSS_TOL
    assert worst <= WEIGHT_TOL, worst_name
    assert moved == len(start)
    changed = [n for n, p in thinker.named_parameters() if not p.requires_grad and not torch.equal(p, base_before[n])]
    assert not changed, changed[:5]  # the frozen base: bit-identical


def _layout_grads(hf_dir, tmp_path, targets: str) -> tuple[dict, dict]:
    """tests/dist/lora_layout_grads.py under torchrun (2 ranks): (the tp1 reference, the other layouts' errors)."""
    import os
    import subprocess
    import sys

    from test_train_layouts import _DIST_VARS, REPO, _global_batch

    torch.save(_global_batch(hf_dir, tmp_path / "demo"), tmp_path / "batches.pt")
    out = tmp_path / "layouts.json"
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(REPO / "tests/dist/lora_layout_grads.py"), str(hf_dir), str(tmp_path / "batches.pt"),
                    str(out), targets], check=True, cwd=REPO, env=dict(env, OMP_NUM_THREADS="1"), timeout=1500)
    results = json.loads(out.read_text())
    reference = results.pop("tp1_dp2")
    print(f"reference tp1 (dp2): loss {reference['loss']:.7f}, {reference['tensors']} adapter gradients, "
          f"{reference['nonzero']} non-zero")
    assert reference["nonzero"] == reference["tensors"] and not reference["trainable_base"]
    assert set(results) == {"tp2_sp", "ep2_dp2", "tp2_etp2_sp", "pp2"}
    for name, r in results.items():
        print(f"{name}: loss rel {r['loss_rel']:.1e}, grad norm {r['grad_norm']:.6f} (rel {r['grad_norm_rel']:.1e}), "
              f"worst adapter gradient rel {r['grad_worst_rel']:.1e} ({r['grad_worst']})")
        assert r["num_tokens"] == reference["num_tokens"] and r["tensors"] == reference["tensors"], name
        assert not r["trainable_base"], (name, r["trainable_base"][:3])
        assert r["loss_rel"] <= 1e-5 and r["grad_worst_rel"] <= 1e-5 and r["grad_norm_rel"] <= 1e-5, (name, r)
    return reference, results


@pytest.mark.slow
def test_adapter_gradients_equal_across_layouts(tiny_hf_dir, tmp_path):
    """(torchrun, 2 ranks, gloo, fp32) One step's loss, EVERY adapter gradient (placed into full tensors) and mcore's
    clipping grad norm equal across tp1 (dp2) / tp2+sp / ep2 (dp2) / tp2+etp2+sp / pp2 (tests/dist/lora_layout_grads.py);
    only adapters train."""
    _layout_grads(tiny_hf_dir, tmp_path, "attention,experts")


@pytest.mark.slow
def test_every_target_equal_across_layouts(tmp_path):
    """The same with every target on a tiny model that has a dense MLP layer (layer 1): the towers' adapters (TP-split
    with the tower, or whole where the audio tower is replicated) and the gated dense fc1's [gate; up] parts."""
    from omni_model.configs import tiny_config
    from omni_model.tiny import write_tiny_checkpoint

    config = tiny_config()
    config["thinker_config"]["text_config"]["mlp_only_layers"] = [1]
    hf_dir = write_tiny_checkpoint(tmp_path / "hf", seed=0, config=config)
    reference, _ = _layout_grads(hf_dir, tmp_path, "attention,experts,dense_mlp,vision,audio")
    assert reference["tensors"] > 48


def test_planner_counts_the_adapters_of_a_built_model(tiny_hf_dir):
    """The memory planner's LoRA terms: its adapter count equals the adapters inject_lora builds (tiny model, every
    target), the frozen base's weights are counted once, and grads + optimizer state are the adapters' only."""
    from omni_model.layout import Layout
    from omni_model.model.lora import inject_lora
    from omni_model.model.thinker import build_thinker
    from omni_model.plan import Workload, estimate, lora_params, stage_params
    from omni_model.runtime.parallel import init_parallel
    from omni_model.train.settings import LoraSpec

    hf_config = json.loads((tiny_hf_dir / "config.json").read_text())
    init_parallel(seed=1)
    for targets in (("attention", "experts"), ("attention",), ("experts",)):
        thinker = build_thinker(tiny_hf_dir)
        inject_lora(thinker, LoraSpec(rank=4, targets=targets), seed=0)
        built = sum(p.numel() for p in thinker.parameters() if p.requires_grad)
        work = Workload(lora_rank=4, lora_targets=targets, bf16=False, freeze_vision=True, freeze_audio=True)
        dense, expert = lora_params(hf_config, Layout(), work)
        est = estimate(hf_config, Layout(), work)
        print(f"{targets}: built {built} adapter parameters, planned {dense} + {expert}")
        assert dense + expert == built
        assert est.parts["grads"] == 4 * built and est.parts["optimizer"] == 8 * built  # fp32: Adam's 2 moments
        assert est.parts["weights"] == 4 * (stage_params(hf_config, Layout()).total + built)


@pytest.mark.parametrize("lora, train, message", [
    (dict(targets=["attention", "mlp"]), {}, r"train.lora.targets.1 = 'mlp': must be one of: attention, experts"),
    (dict(targets=[]), {}, r"train.lora.targets = \[\]: \[\] should be non-empty"),
    ({}, dict(freeze_audio=True), "train.lora freezes the whole base model itself"),
])
def test_lora_settings_refused_naming_the_key(lora, train, message):
    """Values the schema refuses are refused whether LoRA is on or off (the workflow's config check does the same);
    a combination only LoRA forbids, only when it is on."""
    from omni_model.train.settings import SettingsError, check_config

    with pytest.raises(SettingsError, match=message):
        check_config({**train, "lora": {"enabled": True, **lora}}, {})
    if not lora:
        check_config({"lora": {"enabled": False}, **train}, {})  # off: freezing is the user's choice again
