"""torchrun --nproc_per_node 2 tests/dist/plan_counts.py HF_DIR OUT.json

For each layout below, builds this rank's training objects exactly as the finetune run does (omni_model.train.build:
thinker, freeze, mcore DDP, get_megatron_optimizer; CPU: fp32, plain optimizer), takes one optimizer step on zero
gradients so that Adam allocates its state, and records per rank: parameters by kind (LLM dense / expert / vision /
audio), trainable parameters, DDP grad-buffer elements and optimizer-state bytes (exp_avg + exp_avg_sq). Rank 0
writes every rank's figures to OUT.json; tests/test_plan.py compares them with omni_model.plan.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

LAYOUTS = {
    "tp2_freeze_vision": ({"tp": 2}, {"freeze_vision": True}),
    "ep2_dp2_freeze_audio": ({"ep": 2}, {"freeze_audio": True}),
    "tp2_ep2": ({"tp": 2, "ep": 2}, {}),
    "tp2_ep2_freeze_llm": ({"tp": 2, "ep": 2}, {"freeze_llm": True}),
}


def kind_of(name: str) -> str:
    if name.startswith("vision_model."):
        return "vision"
    if name.startswith("audio_model."):
        return "audio"
    return "llm_expert" if ".mlp.experts." in name else "llm_dense"


def measure(hf_dir: str, parallel: dict, freeze: dict) -> dict:
    from megatron.core import parallel_state as ps

    from omni_model.train.build import build_training, init_training_parallel
    from omni_model.train.settings import TrainSettings

    settings = TrainSettings(hf_dir=hf_dir, init_checkpoint="", shards="", train_dir="",
                             train={"cpu_procs": 2, "global_batch_size": 2, **freeze}, parallel=parallel)
    init_training_parallel(settings)
    training = build_training(settings, load_initial_weights=False)
    counts = {"llm_dense": 0, "llm_expert": 0, "vision": 0, "audio": 0}
    trainable = 0
    for name, param in training.thinker.named_parameters():
        counts[kind_of(name)] += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    ddp = training.model
    grad_elements = sum(buffer.grad_data.numel() for buffer in ddp.buffers + ddp.expert_parallel_buffers)
    # one step on zero gradients: torch Adam allocates exp_avg / exp_avg_sq for every parameter with a gradient
    ddp.zero_grad_buffer()
    training.optimizer.zero_grad()
    for param in training.thinker.parameters():
        if param.requires_grad:
            param.main_grad.zero_()
    training.optimizer.step()
    state_bytes = 0
    for opt in getattr(training.optimizer, "chained_optimizers", [training.optimizer]):
        for state in opt.optimizer.state.values():
            state_bytes += sum(t.numel() * t.element_size() for key, t in state.items()
                               if key != "step" and torch.is_tensor(t))
    return {"rank": torch.distributed.get_rank(), "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "dp": ps.get_data_parallel_world_size(), "expert_dp": ps.get_expert_data_parallel_world_size(),
            "params": counts, "trainable": trainable, "grad_elements": grad_elements, "optimizer_bytes": state_bytes}


def main():
    hf_dir, out_path = sys.argv[1:3]
    from omni_model.runtime.parallel import destroy_parallel

    results = {}
    for name, (parallel, freeze) in LAYOUTS.items():
        mine = measure(hf_dir, parallel, freeze)
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, mine)
        results[name] = {"parallel": parallel, "freeze": freeze, "ranks": gathered}
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
