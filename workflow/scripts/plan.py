"""Rule `plan`: the memory planner's table for the configured run (omni_model.plan); fails on a layout that cannot
fit train.gpu_memory_gib, naming the layouts that do."""

import json
from pathlib import Path

from omni_model.plan import GIB, check_run, model_config_of, table, world_size_of

params = snakemake.params  # noqa: F821
train, parallel = dict(params.train), dict(params.parallel)
hf_config = model_config_of({"model": dict(params.model)})
estimate = check_run(hf_config, train, parallel, world_size_of(train), on_gpu=train["gpus_per_node"] > 0)
limit = train.get("gpu_memory_gib")
text = table([estimate]) + "\n" + (f"fits: {estimate.total / GIB:.1f} of {limit} GiB per GPU\n" if limit is not None
                                   else "train.gpu_memory_gib is null: no check\n")
Path(snakemake.output.table).write_text(text)  # noqa: F821
Path(snakemake.output.json).write_text(json.dumps({**estimate.row(), "gpu_memory_gib": limit}, indent=1) + "\n")  # noqa: F821
print(text, end="", flush=True)
