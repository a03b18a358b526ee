"""Rule `download`: put the checkpoint that `fetch_model` verified at results/model/hf (one rename)."""

from pathlib import Path

from omni_model.download import publish_fetched
from omni_model.runtime.logs import stage_logging

with stage_logging(snakemake.log[0], "download_publish") as log:  # noqa: F821
    manifest = publish_fetched(Path(snakemake.input[0]), Path(snakemake.output.manifest).parent)  # noqa: F821
    log.info("published %s: %d files, source %s", snakemake.output.manifest, len(manifest["files"]),  # noqa: F821
             manifest["source"])
