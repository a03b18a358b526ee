"""MoE decoder layers at the released 30B-A3B shape: our grouped-GEMM experts vs the baselines, one GPU, bf16.

Rows (same run, same inputs; 2 decoder layers, hidden 2048, 32/4 heads x 128, seq 4096, micro-batch 1):
  dense FFN 6144        - the yardstick: a dense layer doing the same active math (top-8 x 768 = 6144 per token)
  ours (grouped GEMM)   - omni_model's local spec: SDPA attention + torch._grouped_mm experts, one [E,out,in] weight,
                          no host sync per layer, allgather dispatcher at EP=1 (the alltoall one is a row too)
  mcore SequentialMLP   - Megatron-Core 0.16's only non-TE experts: a Python loop over the 128 experts
  transformers          - Qwen3OmniMoe thinker text layers of transformers (its default experts implementation),
                          without and with the router load-balancing loss that training adds (ours always computes it)
Each: forward + backward of the same plain cross-entropy loss over the logits; median of the timed steps after
warm-up; peak memory of the step.

    python bench/moe_layer.py [--seq 4096] [--steps 10] [--out results.md]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

VOCAB = 32000  # the output layer is not what is measured: keep it small


def text_config(dense: bool) -> dict:
    from omni_model.configs import released_30b_a3b_config

    cfg = released_30b_a3b_config()
    text = cfg["thinker_config"]["text_config"]
    text.update(num_hidden_layers=2, vocab_size=VOCAB)
    cfg["thinker_config"]["vision_config"]["deepstack_visual_indexes"] = []  # text-only layers are measured
    if dense:
        text.update(mlp_only_layers=[0, 1], intermediate_size=8 * 768)
    return cfg


def build_ours(dense: bool, sequential: bool, **config_kw):
    from omni_model.model import specs
    from omni_model.model.language_model import build_language_model

    original = specs._moe_spec
    if sequential:  # baseline only: swap the experts for mcore's SequentialMLP
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.mlp import MLPSubmodules
        from megatron.core.transformer.moe.experts import SequentialMLP
        from megatron.core.transformer.spec_utils import ModuleSpec

        def sequential_spec(use_te):
            spec = copy.deepcopy(original(use_te))
            spec.submodules.experts = ModuleSpec(
                module=SequentialMLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
            return spec

        specs._moe_spec = sequential_spec
    try:
        overrides = {"moe_grouped_gemm": False} if sequential else {}
        model = build_language_model(text_config(dense), dtype=torch.bfloat16, use_te=False, **overrides, **config_kw)
    finally:
        specs._moe_spec = original
    return model.cuda().train()


def step_ours(model, ids, pos):
    # the same loss head as step_hf (plain cross entropy), so that only the decoder layers differ between rows
    logits = model(input_ids=ids, position_ids=pos)  # [B, S, V]
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    loss.backward()


def build_hf():
    from transformers import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

    thinker = Qwen3OmniMoeConfig(**text_config(dense=False)).thinker_config
    model = Qwen3OmniMoeThinkerForConditionalGeneration(thinker).to(torch.bfloat16)
    del model.model.visual, model.model.audio_tower  # only the text layers are measured
    return model.cuda().train()


def step_hf(model, ids, pos, aux_loss: bool = False):
    lm = model.model.language_model
    out = lm(input_ids=ids, position_ids=pos, output_router_logits=aux_loss)
    loss = torch.nn.functional.cross_entropy(model.lm_head(out.last_hidden_state).float().flatten(0, 1), ids.flatten())
    if aux_loss:  # what training with transformers adds: the router load-balancing loss (ours always has it)
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import load_balancing_loss_func

        text = model.config.text_config
        loss = loss + text.router_aux_loss_coef * load_balancing_loss_func(
            out.router_logits, text.num_experts, text.num_experts_per_tok)
    loss.backward()


def measure(step, model, ids, pos, steps: int, warmup: int = 3) -> tuple[float, float]:
    for _ in range(warmup):
        step(model, ids, pos)
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(model, ids, pos)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, args.seq), device="cuda")
    pos = torch.arange(args.seq, device="cuda").view(1, 1, -1).expand(3, 1, -1)

    rows = []
    for name, build, step in (
        ("dense FFN 6144 (yardstick)", lambda: build_ours(dense=True, sequential=False), step_ours),
        ("ours: grouped-GEMM experts", lambda: build_ours(dense=False, sequential=False), step_ours),
        ("ours, alltoall dispatcher at EP=1", lambda: build_ours(False, False, dispatcher="alltoall"), step_ours),
        ("mcore 0.16 SequentialMLP experts", lambda: build_ours(dense=False, sequential=True), step_ours),
        ("transformers 5.24 Qwen3-Omni layers", build_hf, step_hf),
        ("transformers 5.24, + router aux loss (as trained)", build_hf,
         lambda model, ids, pos: step_hf(model, ids, pos, aux_loss=True)),
    ):
        model = build()
        seconds, memory = measure(step, model, ids, pos, args.steps)
        rows.append((name, seconds, memory))
        print(f"{name}: {seconds * 1e3:.1f} ms, {memory:.1f} GiB", flush=True)
        del model
        torch.cuda.empty_cache()

    dense = rows[0][1]
    ours = rows[1][1]
    lines = [
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, 2 layers of the 30B-A3B shape, "
        f"seq {args.seq}, micro-batch 1, forward+backward, median of {args.steps} steps",
        "",
        "| layers | step (ms) | vs dense | vs ours | peak memory (GiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, seconds, memory in rows:
        lines.append(f"| {name} | {seconds * 1e3:.1f} | {seconds / dense:.2f}x | {seconds / ours:.2f}x | {memory:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
