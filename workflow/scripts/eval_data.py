"""Rule `eval_data`: eval.data (a jsonl in the formats of data.raw) -> results/eval/data/{processed.jsonl, shards/,
report.json} through the training data's validation and encoding, with its overlap with the training split."""

from pathlib import Path

from omni_model.runtime.logs import console_line, stage_logging

inp, params = snakemake.input, snakemake.params  # noqa: F821
with stage_logging(snakemake.log[0], "eval_data") as log:  # noqa: F821
    from omni_model.eval.data import prepare_eval_data

    data = dict(params.data)
    max_seq_len = data.pop("max_seq_len")
    report = prepare_eval_data(Path(inp.raw), Path(snakemake.output[0]), Path(inp.manifest).parent,  # noqa: F821
                               Path(inp.processed), Path(inp.shards).with_suffix(""), fmt=params.format, max_seq_len=max_seq_len,
                               media_overrides=data)
    overlap = report["overlap_with_training"]["samples"]
    console_line(f"[eval_data] {report['input']} input = {report['kept']} kept + {report['dropped']} dropped; "
                 f"{overlap} also in the training split")
