"""Rule `codec`: the speech codec of model.codec at results/model/codec (+ MANIFEST.json), checked against the
checkpoint (omni_model.download.fetch_codec)."""

from pathlib import Path

from omni_model.download import fetch_codec
from omni_model.runtime.logs import stage_logging

with stage_logging(snakemake.log[0], "codec") as log:  # noqa: F821
    manifest = fetch_codec(snakemake.config["model"], Path(snakemake.output.manifest).parent,  # noqa: F821
                           Path(snakemake.input.manifest).parent, log=log.info)  # noqa: F821
    log.info("codec ready: %d files, source %s", len(manifest["files"]), manifest["source"])
