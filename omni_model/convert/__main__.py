"""CLI: convert an HF Qwen3-Omni checkpoint into a Megatron-Core torch_dist checkpoint of the thinker.

    python -m omni_model.convert --hf results/model/hf --out results/model/mcore --dtype fp32
    python -m torch.distributed.run --nproc_per_node 4 -m omni_model.convert --hf ... --out ... --tp 2 --ep 2

Every rank converts its own shard (layout from --tp/--pp/--ep/--etp); add --parity to run the parity gate after
converting (single process only; under torchrun the caller runs `omni_model.convert.parity` afterwards).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m omni_model.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True, help="HF checkpoint dir (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output dir (checkpoint/ + HF side files + convert.json)")
    for name in ("tp", "pp", "ep", "etp"):
        parser.add_argument(f"--{name}", type=int, default=1)
    parser.add_argument("--first-stage-layers", type=int, default=None,
                        help="LLM layers on the first pipeline stage (parallel.first_stage_layers; the deepstack layers must be there)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--use-te", action="store_true", help="TransformerEngine layer specs (model.use_te)")
    parser.add_argument("--parity", action="store_true", help="run the parity gate afterwards (one process)")
    parser.add_argument("--parity-layers", type=int, default=0, help="gate on the first N LLM layers (0 = all)")
    args = parser.parse_args(argv)

    import torch

    from ..layout import Layout
    from ..runtime.parallel import destroy_parallel, init_parallel
    from .checkpoint import convert_checkpoint

    torch.set_num_threads(max(1, torch.get_num_threads()))
    init_parallel(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    log = (lambda line: print(line, flush=True))
    try:
        # the pipeline split of parallel.first_stage_layers, as finetune builds it (omni_model.layout)
        layout = Layout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, first_stage_layers=args.first_stage_layers)
        model_kw = layout.split_overrides()
        convert_checkpoint(args.hf, args.out, dtype=args.dtype, use_te=args.use_te, log=log, model_kw=model_kw)
        if args.parity:
            if torch.distributed.get_world_size() > 1:
                sys.exit("--parity runs in one process; run `python -m omni_model.convert.parity` after torchrun")
            from .parity import run_parity_gate

            run_parity_gate(args.hf, args.out, dtype=args.dtype, use_te=args.use_te, layers=args.parity_layers,
                            log=log)
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
