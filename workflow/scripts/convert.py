"""Rule `convert`: results/model/hf -> results/model/mcore (torch_dist checkpoint of the thinker + HF side files +
convert.json), then the parity gate (parity.json; the rule fails over tolerance). One process when convert.procs is
1 (layout tp1: the checkpoint reshards on load), else torchrun with the parallel.* layout (omni_model.convert CLI).
Both write into a staging folder, moved into place only when the gate passed; the rule's declared output, the marker
`mcore.done` beside it, is written last (a failed run never touches the previous checkpoint: rules/convert.smk).
Logging through stage_logging: timestamped progress per stage (build, tensors read with rate + ETA, save, parity) in
logs/convert.log, the counts at the end, one console line on failure."""

import json
from pathlib import Path

from omni_model.runtime.logs import stage_logging
from omni_model.runtime.publish import staged_outputs, write_marker


def main(smk) -> None:
    with stage_logging(smk.log[0], "convert") as logger:  # first: the imports below print warnings (to the log)
        from omni_model.download import require_intact

        log = logger.info
        convert, parallel, use_te = smk.params.convert, smk.params.parallel, bool(smk.params.use_te)
        hf_dir, marker = Path(smk.input.manifest).parent, Path(smk.output.done)
        require_intact(hf_dir)  # before importing torch + mcore: a damaged input fails in seconds
        with staged_outputs({"mcore": marker.with_suffix("")}, "convert") as staged:
            record = convert_and_check(hf_dir, staged["mcore"], convert, parallel, use_te, log)
        log(f"converted {record['thinker_tensors_read']} thinker tensors ({sum(record['parameters'].values()):,} "
            f"parameters in all parts), {record['left_for_export']['count']} talker/code2wav tensors left for export, "
            f"{len(record.get('hf_files', []))} HF side files; seconds {record['seconds']}")
        write_marker(marker, f"converted {hf_dir}: {record['thinker_tensors_read']} thinker tensors")  # last


def convert_and_check(hf_dir: Path, out_dir: Path, convert: dict, parallel: dict, use_te: bool, log) -> dict:
    """Convert into out_dir and run the parity gate there (raises over tolerance); returns convert.json."""
    from omni_model.convert import convert_checkpoint
    from omni_model.convert.parity import run_parity_gate
    from omni_model.runtime.launch import run_torchrun
    from omni_model.runtime.parallel import destroy_parallel, init_parallel

    procs = int(convert["procs"])
    try:
        if procs == 1:
            log("converting in one process (layout tp1 pp1 ep1 etp1: the checkpoint reshards on load)")
            init_parallel()
            convert_checkpoint(hf_dir, out_dir, dtype=convert["dtype"], use_te=use_te, log=log)
        else:
            layout = [f"--{name}={parallel[name]}" for name in ("tp", "pp", "ep", "etp")]
            if parallel.get("first_stage_layers"):  # the pipeline split finetune trains with
                layout.append(f"--first-stage-layers={parallel['first_stage_layers']}")
            log(f"converting on {procs} ranks under torchrun ({' '.join(layout)})")
            run_torchrun("omni_model.convert", ["--hf", str(hf_dir), "--out", str(out_dir), "--dtype",
                                                convert["dtype"], *layout, *(["--use-te"] if use_te else [])],
                         nproc_per_node=procs)
            init_parallel()
        if convert["parity"]:
            run_parity_gate(hf_dir, out_dir, dtype=convert["dtype"], use_te=use_te,
                            layers=int(convert["parity_layers"]), log=log)
        else:
            (out_dir / "parity.json").write_text(json.dumps({"pass": None, "checked": False,
                                                             "reason": "convert.parity is false"}, indent=2))
            log("parity gate skipped (convert.parity: false)")
    finally:
        destroy_parallel()
    return json.loads((out_dir / "convert.json").read_text())


# dist_checkpointing.save starts a `spawn` helper process that re-imports the main script: run only as the script
if __name__ == "__main__":
    main(snakemake)  # noqa: F821
