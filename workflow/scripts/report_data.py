"""Rule `report_data`: data summary plot + table, drop list, token-length histogram, data-stage benchmarks."""

import json
from pathlib import Path

from omni_model import reporting
from omni_model.runtime.logs import stage_logging

out = snakemake.output  # noqa: F821
with stage_logging(snakemake.log[0], "report_data") as log:  # noqa: F821
    shards = Path(snakemake.input.shards).with_suffix("")  # noqa: F821  (the input is the marker beside it)
    report = json.loads((shards / "report.json").read_text())
    reporting.data_summary(report, Path(out.summary), Path(out.table))
    dropped = reporting.drops_table(shards / "drops.jsonl", Path(out.drops))
    counts = reporting.shard_token_counts(shards)
    reporting.token_histogram(counts, Path(out.tokens), snakemake.config["data"]["max_seq_len"])  # noqa: F821
    rules = reporting.benchmarks_table(Path("benchmarks"), snakemake.params.stages, Path(out.benchmarks))  # noqa: F821
    log.info("report items: %d input, %d kept, %d dropped listed, %d token counts, %d benchmark rows",
             report["input"], report["kept"], dropped, sum(map(len, counts.values())), rules)
