"""torchrun --nproc_per_node 4 tests/dist/cp_layout_grads.py HF_DIR BATCHES.pt OUT.json

Context parallelism is the same computation: one training step's forward/backward of the same global batch
(BATCHES.pt: packed rows mixing a long audio, a video and short text conversations) at cp1 (dp4, the reference) and
at cp2, cp2+tp2 (sequence parallel), cp2+ep2 and cp2+pp2, each through our forward_step, mcore's schedule, DDP and
finalize_model_grads (fp32, gloo, MoE aux loss on), as tests/dist/train_layout_grads.py does for the other layouts
(its run_layout / compare). The cp layouts take the LM loss over chunks of LOSS_CHUNK_TOKENS logit rows
(model.chunked_loss; several chunks per micro-batch on every rank, with TP + SP, EP and on the last pipeline stage)
while the cp1 reference runs unchunked: chunked + CP equals the plain loss. Rank 0 writes loss, aux loss and the worst
gradient error of each layout to OUT.json.
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
sys.path.insert(0, os.path.dirname(__file__))

from train_helpers import to_hf_names  # noqa: E402
from train_layout_grads import compare, run_layout  # noqa: E402

LAYOUTS = {
    "cp1_dp4": dict(),
    "cp2_dp2": dict(cp=2),
    "cp2_tp2_sp": dict(cp=2, tp=2),
    "cp2_ep2_dp2": dict(cp=2, ep=2),
    "cp2_pp2": dict(cp=2, pp=2),
}
LOSS_CHUNK_TOKENS = 96  # the cp2 ranks' micro-batches hold ~100-500 tokens: 2-6 chunks each (the last one short)


def main():
    hf_dir, batches_path, out_path = sys.argv[1:4]
    only = set(sys.argv[4].split(",")) if len(sys.argv) > 4 else set(LAYOUTS)
    from megatron.core import parallel_state as ps

    from omni_model.convert.mapping import current_coord
    from omni_model.runtime.parallel import destroy_parallel

    batches = torch.load(batches_path, weights_only=False)
    reference, results = None, {}
    for index, (name, layout) in enumerate(LAYOUTS.items()):
        if index and name not in only:  # the reference (first) layout always runs
            continue
        step = run_layout(hf_dir, batches, layout, loss_chunk_tokens=LOSS_CHUNK_TOKENS if index else 0)
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (current_coord(), step["grads"]))
        if torch.distributed.get_rank() == 0:
            # the CP ranks of a replica hold identical (DP x CP reduced) gradients: any one of them serves
            full = to_hf_names(dict(gathered), hf_dir, step["tconfig"])
            entry = {"loss": step["loss"], "num_tokens": step["num_tokens"], "aux": step["aux"].tolist()}
            if reference is None:
                reference = {"loss": step["loss"], "aux": step["aux"], "grads": full}
                entry.update(reference=True, tensors=len(full))
            else:
                entry.update(compare(full, reference["grads"]),
                             loss_rel=abs(step["loss"] - reference["loss"]) / reference["loss"],
                             aux_rel=((step["aux"] - reference["aux"]).abs().max()
                                      / reference["aux"].abs().max()).item())
            results[name] = entry
            print(f"[cp layouts] {name}: {json.dumps(entry)}", flush=True)
        del step, gathered
        gc.collect()
        ps.destroy_model_parallel()
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
