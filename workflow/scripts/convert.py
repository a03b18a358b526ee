"""Rule `convert`: results/model/hf -> results/model/mcore (torch_dist checkpoint of the thinker + HF side files +
convert.json), then the parity gate (parity.json; the rule fails over tolerance). One process when convert.procs is
1 (layout tp1: the checkpoint reshards on load), else torchrun with the parallel.* layout (omni_model.convert CLI)."""

import json
import logging
from pathlib import Path


def main(smk) -> None:
    from omni_model.convert import convert_checkpoint
    from omni_model.convert.parity import run_parity_gate
    from omni_model.download import require_intact
    from omni_model.runtime.launch import run_torchrun
    from omni_model.runtime.parallel import destroy_parallel, init_parallel

    logging.basicConfig(filename=smk.log[0], level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.info
    convert, parallel, use_te = smk.params.convert, smk.params.parallel, bool(smk.params.use_te)
    hf_dir, out_dir = Path(smk.input.manifest).parent, Path(smk.output.convert).parent
    require_intact(hf_dir)
    procs = int(convert["procs"])
    if procs == 1:
        log("converting in one process (layout tp1 pp1 ep1 etp1; the checkpoint reshards to any layout on load)")
        init_parallel()
        convert_checkpoint(hf_dir, out_dir, dtype=convert["dtype"], use_te=use_te, log=log)
    else:
        layout = [f"--{name}={parallel[name]}" for name in ("tp", "pp", "ep", "etp")]
        log(f"converting on {procs} ranks under torchrun ({' '.join(layout)})")
        run_torchrun("omni_model.convert", ["--hf", str(hf_dir), "--out", str(out_dir), "--dtype", convert["dtype"],
                                            *layout, *(["--use-te"] if use_te else [])],
                     nproc_per_node=procs, log=Path(smk.log[0]))
        init_parallel()
    try:
        if convert["parity"]:
            run_parity_gate(hf_dir, out_dir, dtype=convert["dtype"], use_te=use_te,
                            layers=int(convert["parity_layers"]), log=log)
        else:
            Path(smk.output.parity).write_text(json.dumps({"pass": None, "checked": False,
                                                           "reason": "convert.parity is false"}, indent=2))
            log("parity gate skipped (convert.parity: false)")
    finally:
        destroy_parallel()


# dist_checkpointing.save starts a `spawn` helper process that re-imports the main script: run only as the script
if __name__ == "__main__":
    main(snakemake)  # noqa: F821
