"""Rule `report_convert`: the conversion parity report + the convert benchmark."""

from pathlib import Path

from omni_model import reporting
from omni_model.runtime.logs import stage_logging

out = snakemake.output  # noqa: F821
with stage_logging(snakemake.log[0], "report_convert") as log:  # noqa: F821
    reporting.parity_table(Path(snakemake.input.parity), Path(snakemake.input.convert), Path(out.parity))  # noqa: F821
    reporting.benchmarks_table(Path("benchmarks"), snakemake.params.stages, Path(out.benchmarks))  # noqa: F821
    log.info("parity report written: %s", out.parity)
