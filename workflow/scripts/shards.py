"""Rule `shards`: processed.jsonl -> WebDataset tars + Energon .nv-meta + complete drop report (omni_model.data.shards)."""

import json
import logging
from pathlib import Path

from omni_model.data.shards import write_shards

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, format="%(asctime)s %(message)s")  # noqa: F821
params = snakemake.params  # noqa: F821
write_shards(
    Path(snakemake.input.processed), Path(snakemake.output[0]), Path(snakemake.input.manifest).parent,  # noqa: F821
    previous_drops=Path(snakemake.input.drops),  # noqa: F821
    input_count=json.loads(Path(snakemake.input.report).read_text())["input"],  # noqa: F821
    max_samples=params.max_samples, max_bytes=params.max_bytes, val_fraction=params.val_fraction, seed=params.seed,
    max_seq_len=params.max_seq_len, media_overrides=dict(params.media, use_audio_in_video=params.use_audio_in_video),
    workers=snakemake.threads,  # noqa: F821
)
