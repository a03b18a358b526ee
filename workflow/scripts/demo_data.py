"""Rule `demo_data`: the deterministic synthetic multimodal demo set (omni_model.data.demo does the work)."""

import logging
from pathlib import Path

from omni_model.data.demo import generate_demo

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, format="%(asctime)s %(message)s")  # noqa: F821
path = generate_demo(Path(snakemake.output.jsonl).parent, snakemake.params.samples, snakemake.params.seed)  # noqa: F821
logging.info("demo set written: %s (%d lines)", path, sum(1 for _ in open(path)))
