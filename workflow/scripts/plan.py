"""Rule `plan`: the memory planner's table for the configured run (omni_model.plan); fails on a layout that cannot
fit train.gpu_memory_gib, naming the layouts that do. The table (or the refusal with the layouts that fit) is what
the user asked for: it goes to the console as well as to logs/plan.log."""

import json
from pathlib import Path

from omni_model.plan import GIB, PlanError, check_run, model_config_of, table, world_size_of
from omni_model.runtime.logs import console_line, stage_logging
from omni_model.schema import TrainConfig

params = snakemake.params  # noqa: F821
with stage_logging(snakemake.log[0], "plan") as log:  # noqa: F821
    train, parallel = TrainConfig.of(dict(params.train)), dict(params.parallel)
    hf_config = model_config_of({"model": dict(params.model)})
    try:
        estimate = check_run(hf_config, train, parallel, world_size_of(train), on_gpu=train.gpus_per_node > 0)
    except PlanError as error:
        console_line(str(error))
        raise
    limit = train.gpu_memory_gib
    text = table([estimate]) + "\n" + (f"fits: {estimate.total / GIB:.1f} of {limit} GiB per GPU" if limit is not None
                                       else "train.gpu_memory_gib is null: no check")
    Path(snakemake.output.table).write_text(text + "\n")  # noqa: F821
    Path(snakemake.output.json).write_text(json.dumps({**estimate.row(), "gpu_memory_gib": limit}, indent=1) + "\n")  # noqa: F821
    console_line(text)
    log.info("planned %s: %.1f GiB per GPU", estimate.layout.describe(), estimate.total / GIB)
