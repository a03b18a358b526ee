"""torchrun --nproc_per_node 2 tests/dist/talker_parallel_parity.py HF_DIR REF.pt OUT.json

For each layout (TP2+SP, EP2, TP2+EP2+SP, TP2+ETP2+SP) builds the talker of this rank, loads its HF shard through the
talker's mapping rows, and compares with the single-process run stored in REF.pt: the first-group and code-predictor
logits (full vocabulary, gathered over TP), the training loss (omni_model.train.talker_step.talker_loss) and its
gradients with respect to the talker's inputs (the thinker embeddings and hidden states, replicated on every rank),
which carry every backward path (sequence-parallel scatter/gather, expert dispatch, the predictor's TP linears).
Rank 0 writes the errors (max abs error / max |reference|) to OUT.json.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch

torch.set_num_threads(1)

LAYOUTS = {
    "tp2_sp": dict(tp=2),
    "ep2": dict(ep=2),
    "tp2_ep2_sp": dict(tp=2, ep=2),
    "tp2_etp2_sp": dict(tp=2, etp=2),
}


def run(hf_dir, batch, predictor_weight):
    """(first logits, residual logits, loss, d loss / d thinker_embeds, d loss / d thinker_hidden) on this rank's
    talker in the current layout (single process: the reference)."""
    from omni_model.convert.mapping import load_hf_into_talker
    from omni_model.model.talker import build_talker, gather_logits
    from omni_model.train.talker_step import talker_loss

    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    talker = build_talker(cfg, dtype=torch.float32, use_te=False)
    load_hf_into_talker(talker, hf_dir)
    talker.eval()
    with torch.no_grad():
        embeds = talker.inputs_embeds(batch.thinker_embeds, batch.codec_codes, batch.multimodal_mask,
                                      batch.thinker_hidden)
        out = talker(embeds, batch.position_ids, frame_positions=batch.frame_positions, frame_codes=batch.frame_codes)
        first, residual = gather_logits(out.first), gather_logits(out.residual)
    talker.train()
    batch.thinker_embeds.requires_grad_(True)
    batch.thinker_hidden.requires_grad_(True)
    loss = talker_loss(talker, batch, predictor_weight).total
    loss.backward()
    grads = (batch.thinker_embeds.grad.clone(), batch.thinker_hidden.grad.clone())
    batch.thinker_embeds.grad = batch.thinker_hidden.grad = None
    return {"first": first, "residual": residual, "loss": loss.detach(), "grad_embeds": grads[0],
            "grad_hidden": grads[1]}


def main():
    hf_dir, ref_path, out_path = sys.argv[1:4]
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from megatron.core import parallel_state as ps

    from omni_model.runtime.parallel import destroy_parallel, init_parallel

    ref = torch.load(ref_path, map_location="cpu", weights_only=False)
    results = {}
    for name, layout in LAYOUTS.items():
        init_parallel(**layout, seed=1234)
        got = run(hf_dir, ref["batch"], ref["predictor_weight"])
        errors = {k: ((got[k] - ref["outputs"][k]).abs().max() / ref["outputs"][k].abs().max()).item() for k in got}
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, errors)
        if torch.distributed.get_rank() == 0:
            results[name] = {k: max(g[k] for g in gathered) for k in errors}
        ps.destroy_model_parallel()
    if torch.distributed.get_rank() == 0:
        json.dump(results, open(out_path, "w"), indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
