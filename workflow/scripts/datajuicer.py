"""Rule `datajuicer`: validate + Data-Juicer recipe -> processed.jsonl, drops.jsonl, datajuicer_report.json
(omni_model.data.datajuicer). Outputs are written to a staging folder and moved into place only on success."""

import json
from pathlib import Path

from omni_model.compat import DATA_PACKAGES, require_verified_upstream
from omni_model.data.datajuicer import run_stage
from omni_model.runtime.logs import stage_logging
from omni_model.runtime.publish import staged_outputs

out = snakemake.output  # noqa: F821
data = snakemake.params.data  # noqa: F821
with stage_logging(snakemake.log[0], "datajuicer") as log, \
        staged_outputs({"processed": out.processed, "drops": out.drops, "report": out.report}, "datajuicer") as staged:
    require_verified_upstream(*DATA_PACKAGES, where="datajuicer stage")
    summary = run_stage(
        Path(snakemake.input.raw), Path(snakemake.input.recipe),  # noqa: F821
        staged["processed"], staged["drops"],
        fmt=data["format"], num_proc=snakemake.threads,  # noqa: F821
        work_dir=staged["report"].parent,
        executor=data["executor"], ray_address=data["ray_address"],
    )
    staged["report"].write_text(json.dumps(summary, indent=2) + "\n")
    log.info("input %d = kept %d + dropped %d", summary["input"], summary["kept"], summary["dropped"])
