"""Rule `report_evaluate`: the "Evaluation" items (before vs after table, per-modality plot, sample table) + the
evaluate benchmarks."""

from pathlib import Path

from omni_model import reporting
from omni_model.eval import report
from omni_model.runtime.logs import stage_logging

inp, out = snakemake.input, snakemake.output  # noqa: F821
with stage_logging(snakemake.log[0], "report_evaluate") as log:  # noqa: F821
    rows = report.comparison_table(Path(inp.base[0]), Path(inp.tuned[0]), Path(out.table))
    mixes = report.modality_plot(Path(inp.base[0]), Path(inp.tuned[0]), Path(out.modality))
    answers = report.sample_table(Path(inp.base_samples[0]), Path(inp.tuned_samples[0]), Path(out.samples))
    reporting.benchmarks_table(Path("benchmarks"), snakemake.params.stages, Path(out.benchmarks))  # noqa: F821
    log.info("evaluation report: %d table rows, modalities %s, %d answers", rows, mixes, answers)
