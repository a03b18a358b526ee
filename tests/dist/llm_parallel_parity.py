"""torchrun --nproc_per_node 2 tests/dist/llm_parallel_parity.py HF_DIR REF.pt OUT.json

For each layout (TP2+SP, EP2, TP2+EP2+SP, and PP2 with deepstack on stage 0) builds the LLM of this rank, loads its
HF shard through the mapping table, runs the batch of REF.pt and compares the full-vocab logits with the
single-process logits stored there (rank 0 writes max abs errors to OUT.json). Also one training step through
mcore's forward_backward schedule: the loss must equal the single-process loss.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch

torch.set_num_threads(1)


def main():
    hf_dir, ref_path, out_path = sys.argv[1:4]
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.language_model import build_language_model
    from omni_model.runtime.parallel import destroy_parallel, init_parallel

    ref = torch.load(ref_path, map_location="cpu")
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    for k in ("ids", "pos", "vmask", "logits"):
        ref[k] = ref[k].to(dev)
    ref["deepstack"] = [t.to(dev) for t in ref["deepstack"]]
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    ids, pos = ref["ids"], ref["pos"]
    results = {}
    layouts = {
        "tp2_sp": dict(tp=2),
        "ep2": dict(ep=2),
        "tp2_ep2_sp": dict(tp=2, ep=2),
        "tp2_etp2_sp": dict(tp=2, etp=2),  # experts split over the TP ranks (expert tensor parallelism)
        "pp2": dict(pp=2),
    }
    for name, lay in layouts.items():
        init_parallel(**lay, seed=1234)
        if torch.cuda.is_available():
            dev = torch.device("cuda", torch.cuda.current_device())
            for k in ("ids", "pos", "vmask", "logits"):
                ref[k] = ref[k].to(dev)
            ref["deepstack"] = [t.to(dev) for t in ref["deepstack"]]
            ids, pos = ref["ids"], ref["pos"]
        nds = None if lay.get("pp", 1) == 1 else 0
        model = build_language_model(cfg, dtype=torch.float32, use_te=False, num_deepstack=nds)
        load_hf_into_model(model, hf_dir)
        model.eval()
        pp = ps.get_pipeline_model_parallel_world_size()
        # 4 tiny layers over 2 stages leave 2 on stage 0 < 3 deepstack layers: PP runs text-only (by design the
        # model refuses deepstack layers off the first stage)
        kwargs = dict(visual_pos_masks=ref["vmask"], deepstack_visual_embeds=ref["deepstack"]) if pp == 1 else {}
        ref_loss = ref["loss"] if pp == 1 else ref["loss_plain"]

        if ps.get_pipeline_model_parallel_world_size() == 1:
            with torch.no_grad():
                logits = model(input_ids=ids, position_ids=pos, **kwargs)  # [B, S, V/tp]
                logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            err = (logits - ref["logits"]).abs().max().item()
        else:
            err = None

        # one training-mode step through the schedule (loss only compared; forward_backward handles PP p2p)
        model.train()
        labels = torch.roll(ids, -1, dims=1)

        def forward_step(data_iterator, m):
            out = m(input_ids=ids, position_ids=pos, labels=labels, **kwargs)  # per-token loss [B, S]

            def loss_func(o):
                loss = o.float().mean()
                return loss, {"loss": loss.detach()}

            return out, loss_func

        model.config.deallocate_pipeline_outputs = False
        fb = get_forward_backward_func()
        losses = fb(
            forward_step_func=forward_step,
            data_iterator=iter([None]),
            model=[model],
            num_microbatches=1,
            seq_length=ids.shape[1],
            micro_batch_size=ids.shape[0],
            forward_only=False,
        )
        loss = losses[0]["loss"].item() if losses else None
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, {"logit_err": err, "loss": loss})
        if torch.distributed.get_rank() == 0:
            errs = [g["logit_err"] for g in gathered if g["logit_err"] is not None]
            ls = [g["loss"] for g in gathered if g["loss"] is not None]
            results[name] = {
                "logit_max_abs_err": max(errs) if errs else None,
                "loss_abs_err": max(abs(l - ref_loss) for l in ls) if ls else None,
                "loss": ls, "ref_loss": ref_loss,
            }
        ps.destroy_model_parallel()
    if torch.distributed.get_rank() == 0:
        json.dump(results, open(out_path, "w"), indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
