"""Rule `download`: a verified HF checkpoint folder + MANIFEST.json (omni_model.download does the work)."""

import logging
from pathlib import Path

from omni_model.download import fetch_checkpoint

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, format="%(asctime)s %(message)s")  # noqa: F821
manifest = fetch_checkpoint(snakemake.params.model, Path(snakemake.output.manifest).parent, log=logging.info)  # noqa: F821
total = sum(meta["size"] for meta in manifest["files"].values())
logging.info("checkpoint ready: %d files, %.1f MB, source %s", len(manifest["files"]), total / 1e6, manifest["source"])
