"""torchrun --nproc_per_node 2 tests/dist/train_layout_grads.py HF_DIR BATCHES.pt OUT.json

One training step's forward/backward of the same global batch (BATCHES.pt: packed multimodal micro-batches) at
several layouts in sequence (parallel_state re-initialised between them), each through our forward_step, mcore's
schedule, DDP and finalize_model_grads (fp32, gloo, MoE aux loss on). The data-parallel ranks of a layout take
every dp_size-th micro-batch. Every rank's gradients (the DDP main_grad, as a state dict) are gathered on rank 0 and
reassembled into full HF-named tensors through the mapping; rank 0 compares loss, per-layer aux loss and every
gradient with the first layout's and writes the errors to OUT.json.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from train_helpers import ddp_thinker, forward_backward, grad_state_dict, to_hf_names  # noqa: E402

AUX_COEFF = 0.01
# 4 layers over 2 stages: 3 on the first so the 3 deepstack layers sit with the vision tower (parallel.first_stage_layers)
FIRST_STAGE_LAYERS = 3
LAYOUTS = {
    "tp1_dp2": dict(),
    "tp2_sp": dict(tp=2),
    "ep2_dp2": dict(ep=2),
    "tp2_ep2_sp": dict(tp=2, ep=2),
    "pp2": dict(pp=2),
}


def run_layout(hf_dir, batches, layout: dict, prepare=None, loss_chunk_tokens: int = 0) -> dict:
    """This layout's step on this rank: loss, aux losses summed over ranks, and the rank's gradient state dict.
    `prepare(thinker)`, if given, runs on the loaded thinker before DDP wraps it (e.g. adding LoRA adapters).
    `loss_chunk_tokens`: train.loss_chunk_tokens (0: the whole micro-batch's logits at once)."""
    from megatron.core import parallel_state as ps

    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.thinker import build_thinker
    from omni_model.layout import Layout
    from omni_model.runtime.parallel import init_parallel
    from omni_model.train.build import allow_variable_seq_lengths

    init_parallel(**layout, seed=1234)
    split = Layout(**layout, first_stage_layers=FIRST_STAGE_LAYERS if layout.get("pp", 1) > 1 else None)
    overrides = {"calculate_per_token_loss": True, "moe_aux_loss_coeff": AUX_COEFF, **split.split_overrides()}
    thinker = build_thinker(hf_dir, config_overrides=overrides)
    if split.pp > 1:  # packed rows differ in length: the stages exchange shapes first (as the training build does)
        allow_variable_seq_lengths(thinker.config)
    load_hf_into_model(thinker, hf_dir, prefix="")
    thinker.language_model.loss_chunk_tokens = loss_chunk_tokens
    if prepare is not None:
        prepare(thinker)
    model = ddp_thinker(thinker.train())
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    result = forward_backward(model, batches[dp_rank::dp])
    aux = result["aux"]["load_balancing_loss"]
    torch.distributed.all_reduce(aux)  # TP partial sums, DP micro-batches, PP stages' own layers: all add up
    return {"loss": result["loss"], "num_tokens": result["num_tokens"], "aux": aux, "model": model,
            "grads": grad_state_dict(model) if prepare is None else None, "tconfig": thinker.language_model.config}


def compare(full: dict, reference: dict) -> dict:
    """Per-tensor relative error ||g - g_ref|| / ||g_ref|| (floored at 1e-6 of the largest tensor norm: gradients that
    are zero in exact arithmetic, e.g. attention key biases, are float noise in both)."""
    assert set(full) == set(reference), sorted(set(full) ^ set(reference))[:5]
    floor = 1e-6 * max(t.norm().item() for t in reference.values())
    errors = {name: (full[name] - ref).norm().item() / max(ref.norm().item(), floor) for name, ref in reference.items()}
    worst = max(errors, key=errors.get)
    towers = [n for n in reference if n.startswith(("thinker.visual.", "thinker.audio_tower."))]
    return {"grad_worst_rel": errors[worst], "grad_worst": worst, "tensors": len(errors),
            "towers_nonzero": all(reference[n].abs().sum() > 0 for n in towers if "k_proj.bias" not in n),
            "max_abs": max((full[n] - reference[n]).abs().max().item() for n in reference)}


def main():
    hf_dir, batches_path, out_path = sys.argv[1:4]
    from megatron.core import parallel_state as ps

    from omni_model.convert.mapping import current_coord
    from omni_model.runtime.parallel import destroy_parallel

    batches = torch.load(batches_path, weights_only=False)
    rank0 = None
    results = {}
    for name, layout in LAYOUTS.items():
        step = run_layout(hf_dir, batches, layout)
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (current_coord(), step["grads"]))
        if torch.distributed.get_rank() == 0:
            full = to_hf_names(dict(gathered), hf_dir, step["tconfig"])
            entry = {"loss": step["loss"], "num_tokens": step["num_tokens"], "aux": step["aux"].tolist()}
            if rank0 is None:
                rank0 = {"loss": step["loss"], "aux": step["aux"], "grads": full}
                entry.update(reference=True, tensors=len(full))
            else:
                entry.update(compare(full, rank0["grads"]), loss_rel=abs(step["loss"] - rank0["loss"]) / rank0["loss"],
                             aux_rel=((step["aux"] - rank0["aux"]).abs().max() / rank0["aux"].abs().max()).item())
            results[name] = entry
            print(f"[layouts] {name}: {json.dumps(entry)}", flush=True)
        del step, gathered
        gc.collect()
        ps.destroy_model_parallel()
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
