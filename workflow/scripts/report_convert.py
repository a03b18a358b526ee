"""Rule `report_convert`: the conversion parity report + the convert benchmark."""

from pathlib import Path

from omni_model import reporting
from omni_model.runtime.logs import stage_logging

out = snakemake.output  # noqa: F821
with stage_logging(snakemake.log[0], "report_convert") as log:  # noqa: F821
    mcore = Path(snakemake.input.convert).with_suffix("")  # noqa: F821  (the input is the marker beside it)
    reporting.parity_table(mcore / "parity.json", mcore / "convert.json", Path(out.parity))
    reporting.benchmarks_table(Path("benchmarks"), snakemake.params.stages, Path(out.benchmarks))  # noqa: F821
    log.info("parity report written: %s", out.parity)
