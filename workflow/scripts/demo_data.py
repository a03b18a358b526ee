"""Rule `demo_data`: the deterministic synthetic multimodal demo set (omni_model.data.demo does the work)."""

from pathlib import Path

from omni_model.data.demo import generate_demo
from omni_model.runtime.logs import stage_logging
from omni_model.runtime.publish import staged_outputs

out = snakemake.output  # noqa: F821
with stage_logging(snakemake.log[0], "demo_data") as log, \
        staged_outputs({"raw": Path(out.jsonl).parent}, "demo_data") as staged:  # noqa: F821
    data = snakemake.params.data  # noqa: F821
    path = generate_demo(staged["raw"], data["demo_samples"], data["seed"])
    if path.name != Path(out.jsonl).name or not (staged["raw"] / Path(out.media).name).is_dir():
        raise RuntimeError(f"generate_demo wrote {path}, not the rule's {out.jsonl} + {out.media}")
    log.info("demo set written: %s (%d lines)", out.jsonl, sum(1 for _ in open(path)))
