"""torchrun worker of test_convert_reshard: convert at one layout, load the written checkpoint at another, compare.

    torchrun --nproc_per_node N tests/dist/convert_reshard.py HF_DIR REF.pt WORK_DIR WRITE LOAD
    (WRITE / LOAD like "tp=2,pp=2,first=3" or "tp=2,ep=2"; first = LLM layers on the first pipeline stage;
    REF.pt holds the thinker inputs and single-process logits)

All ranks convert at WRITE (convert_checkpoint), then mcore's groups are rebuilt at LOAD in the same processes, a
fresh uninitialised thinker is filled by load_checkpoint, and the full-vocab logits are compared with REF.pt's.
Rank 0 writes {"max_abs_error": ...} to WORK_DIR/result.json.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402

torch.set_num_threads(1)


def layout(text: str) -> tuple[dict, dict]:
    """(init_parallel kwargs, build_thinker kwargs)."""
    values = {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}
    first = values.pop("first", None)
    return values, ({"num_layers_in_first_pipeline_stage": first} if first else {})


def main(hf_dir: str, ref_path: str, work: str, write: str, load: str) -> None:
    from megatron.core import tensor_parallel

    from omni_model.convert import convert_checkpoint, load_checkpoint
    from omni_model.model.thinker import build_thinker
    from omni_model.runtime.parallel import destroy_parallel, init_parallel

    out = Path(work) / "mcore"
    parallel, model_kw = layout(write)
    init_parallel(**parallel)
    # group_bytes=0: one save group per unit (each LLM layer, each tower), merged into one checkpoint; with pp=2 the
    # stages have different numbers of groups (a stage with fewer makes empty saves)
    record = convert_checkpoint(hf_dir, out, dtype="fp32", log=lambda line: None, model_kw=model_kw, group_bytes=0)

    parallel, model_kw = layout(load)
    init_parallel(**parallel)  # rebuilds mcore's groups for the loading layout
    thinker = build_thinker(hf_dir, perform_initialization=False, **model_kw).eval()
    load_checkpoint(thinker, out / "checkpoint")
    ref = torch.load(ref_path)
    with torch.no_grad():
        logits = thinker(**ref["inputs"])
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    error = (logits - ref["logits"]).abs().max().item()
    errors = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    if torch.distributed.get_rank() == 0:
        (Path(work) / "result.json").write_text(json.dumps({"written_layout": record["layout"],
                                                            "max_abs_error": max(errors)}))
    destroy_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:6])
