"""Rule `fetch_model`: build/fetch + verify the checkpoint into results/model/hf.fetched (omni_model.download);
the `download` rule publishes it. The working results/model/hf is read (to reuse it when intact), never changed."""

from pathlib import Path

from omni_model.download import fetch_into
from omni_model.runtime.logs import stage_logging

with stage_logging(snakemake.log[0], "download") as log:  # noqa: F821
    fetched = Path(snakemake.output[0])  # noqa: F821  (results/model/hf.fetched)
    manifest = fetch_into(snakemake.config["model"], fetched.with_suffix(""), fetched, log=log.info)  # noqa: F821
    total = sum(meta["size"] for meta in manifest["files"].values())
    log.info("checkpoint ready: %d files, %.1f MB, source %s", len(manifest["files"]), total / 1e6, manifest["source"])
