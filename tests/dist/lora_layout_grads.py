"""torchrun --nproc_per_node 2 tests/dist/lora_layout_grads.py HF_DIR BATCHES.pt OUT.json [TARGETS]

train_layout_grads.py's step (same batches, forward_step, mcore schedule, DDP, finalize_model_grads, fp32, gloo) with
LoRA adapters on the LLM attention and experts, the base frozen, at several layouts. The adapters are initialised
layout-independently with a NON-zero B (with PEFT's zero B every A gradient would be zero and trivially equal). Each
rank's adapter gradients are placed into full tensors on rank 0 (`AdapterShape.place`), compared with the first
layout's, and the errors written to OUT.json.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from train_layout_grads import FIRST_STAGE_LAYERS, run_layout  # noqa: E402,F401

LAYOUTS = {
    "tp1_dp2": dict(),
    "tp2_sp": dict(tp=2),
    "ep2_dp2": dict(ep=2),
    "tp2_etp2_sp": dict(tp=2, etp=2),
    "pp2": dict(pp=2),
}
SPEC = dict(enabled=True, rank=4, alpha=8.0, targets=["attention", "experts"])  # TARGETS (comma-separated) overrides


def add_adapters(thinker) -> None:
    from omni_model.model.lora import init_adapters, inject_lora
    from omni_model.train.settings import LoraSpec

    inject_lora(thinker, LoraSpec.of(SPEC), seed=7)
    init_adapters(thinker, seed=7, b_std=0.05)


def grad_norm(model) -> float:
    """The global gradient norm as mcore's optimizer computes it for clipping (each TP-split factor counted on every
    TP rank, each replicated one once)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, bf16=False, params_dtype=torch.float32,
                             use_distributed_optimizer=False)
    optimizer = get_megatron_optimizer(config, [model], use_gloo_process_groups=True)
    optimizer.prepare_grads()
    return float(optimizer.get_grad_norm())


def local_adapter_grads(model) -> list:
    from omni_model.model.lora import adapter_parameters

    return [(key, shape, param.main_grad.detach().clone()) for key, param, shape in adapter_parameters(model.module)]


def assemble(gathered: list) -> dict:
    full = {}
    for rank_grads in gathered:
        for key, shape, grad in rank_grads:
            target = full.setdefault(key, torch.zeros(shape.full, dtype=grad.dtype))
            shape.place(target, grad)
    return full


def main():
    hf_dir, batches_path, out_path = sys.argv[1:4]
    if len(sys.argv) > 4:
        SPEC["targets"] = sys.argv[4].split(",")
    from megatron.core import parallel_state as ps

    from omni_model.runtime.parallel import destroy_parallel

    batches = torch.load(batches_path, weights_only=False)
    reference, results = None, {}
    for name, layout in LAYOUTS.items():
        step = run_layout(hf_dir, batches, layout, prepare=add_adapters)
        frozen_grads = [n for n, p in step["model"].module.named_parameters() if p.requires_grad and ".lora_" not in n]
        norm = grad_norm(step["model"])
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, local_adapter_grads(step["model"]))
        if torch.distributed.get_rank() == 0:
            full = assemble(gathered)
            entry = {"loss": step["loss"], "num_tokens": step["num_tokens"], "tensors": len(full),
                     "trainable_base": frozen_grads, "grad_norm": norm}
            if reference is None:
                reference = {"loss": step["loss"], "grads": full, "grad_norm": norm}
                entry["nonzero"] = sum(bool(g.abs().sum() > 0) for g in full.values())
            else:
                assert set(full) == set(reference["grads"]), sorted(set(full) ^ set(reference["grads"]))[:5]
                errors = {k: (full[k] - r).norm().item() / max(r.norm().item(), 1e-12)
                          for k, r in reference["grads"].items()}
                worst = max(errors, key=errors.get)
                entry.update(loss_rel=abs(step["loss"] - reference["loss"]) / reference["loss"],
                             grad_norm_rel=abs(norm - reference["grad_norm"]) / reference["grad_norm"],
                             grad_worst_rel=errors[worst], grad_worst=worst)
            results[name] = entry
            print(f"[lora layouts] {name}: {json.dumps(entry)}", flush=True)
        del step, gathered
        gc.collect()
        ps.destroy_model_parallel()
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
