"""Rule `datajuicer`: validate + Data-Juicer recipe -> processed.jsonl, drops.jsonl (omni_model.data.datajuicer)."""

import json
import logging
import sys
from pathlib import Path

from omni_model.data.datajuicer import run_stage

sys.stderr = sys.stdout = open(snakemake.log[0], "a", buffering=1)  # noqa: F821  (Data-Juicer prints and logs)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(message)s")
summary = run_stage(
    Path(snakemake.input.raw), Path(snakemake.input.recipe),  # noqa: F821
    Path(snakemake.output.processed), Path(snakemake.output.drops),  # noqa: F821
    fmt=snakemake.params.format, num_proc=snakemake.threads,  # noqa: F821
)
Path(snakemake.output.report).write_text(json.dumps(summary, indent=2) + "\n")  # noqa: F821
