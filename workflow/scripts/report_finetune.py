"""Rule `report_finetune`: training curves (loss, lr, grad-norm, tokens/s) + the finetune benchmark."""

from pathlib import Path

from omni_model import reporting
from omni_model.runtime.logs import stage_logging

out = snakemake.output  # noqa: F821
with stage_logging(snakemake.log[0], "report_finetune") as log:  # noqa: F821
    train = Path(snakemake.input.train).with_suffix("")  # noqa: F821  (the input is the marker beside it)
    steps = reporting.train_curves(train / "metrics.jsonl", Path(out.curves))
    reporting.benchmarks_table(Path("benchmarks"), snakemake.params.stages, Path(out.benchmarks))  # noqa: F821
    log.info("training curves of %d steps written: %s", steps, out.curves)
