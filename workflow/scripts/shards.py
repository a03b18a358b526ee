"""Rule `shards`: processed.jsonl -> WebDataset tars + Energon .nv-meta + complete drop report (omni_model.data.shards).
Written into a staging folder and moved into place only on success; the rule's declared output, the marker
`shards.done` beside it, is written last (a failed run never removes the previous shards: rules/data.smk)."""

import json
from pathlib import Path

from omni_model.compat import DATA_PACKAGES, require_verified_upstream
from omni_model.data.media import VIDEO_SETTINGS
from omni_model.data.shards import write_shards
from omni_model.runtime.logs import stage_logging
from omni_model.runtime.publish import staged_outputs, write_marker

data = snakemake.params.data  # noqa: F821
with stage_logging(snakemake.log[0], "shards") as log, \
        staged_outputs({"shards": Path(snakemake.output.done).with_suffix("")}, "shards") as staged:  # noqa: F821
    require_verified_upstream(*DATA_PACKAGES, where="shards stage")
    report = write_shards(
        Path(snakemake.input.processed), staged["shards"], Path(snakemake.input.manifest).parent,  # noqa: F821
        previous_drops=Path(snakemake.input.drops),  # noqa: F821
        input_count=json.loads(Path(snakemake.input.report).read_text())["input"],  # noqa: F821
        max_samples=data["shard_max_samples"], max_bytes=data["shard_max_bytes"], val_fraction=data["val_fraction"],
        seed=data["seed"], max_seq_len=data["max_seq_len"],
        media_overrides={key: data[key] for key in ("use_audio_in_video", *VIDEO_SETTINGS)},
        workers=snakemake.threads,  # noqa: F821
        executor=data["executor"], ray_address=data["ray_address"],
        codec_dir=Path(snakemake.input.codec[0]).parent if snakemake.input.codec else None,  # noqa: F821
    )
    log.info("input %d = kept %d (train %d, val %d) + dropped %d; %d shards", report["input"], report["kept"],
             report["train"], report["val"], report["dropped"], len(report["shards"]))
# the marker last, once the folder is in place
write_marker(Path(snakemake.output.done), f"kept {report['kept']}, dropped {report['dropped']}")  # noqa: F821
