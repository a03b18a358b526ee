"""Rule `finetune`: write the run's settings and start `python -m omni_model.train` under torchrun (omni_model.train).

nproc per node = train.gpus_per_node (GPU, nccl) or train.cpu_procs (CPU, gloo). Everything goes to the rule's log
through stage_logging: the ranks' output streamed and timestamped by run_torchrun, a failing rank's traceback, the
step count and first/last loss at the end (also on the console); the console gets one line on failure. train.iters 0: no ranks start;
`latest` names the converted checkpoint. The rule's declared output, the marker `train.done` beside results/train, is
written when the run succeeded (a failed run leaves `latest` and metrics.jsonl as they were: rules/finetune.smk).
The job holds results/train's writer lock while it runs (and its ranks while
they live): a second finetune on the same folder, e.g. next to an orphan of a killed run, is refused.
"""

from pathlib import Path

from omni_model.runtime.logs import console_line, stage_logging
from omni_model.runtime.publish import write_marker

params = snakemake.params  # noqa: F821
with stage_logging(snakemake.log[0], "finetune") as log:  # noqa: F821  (first: the imports below print warnings)
    from omni_model.plan import check_settings
    from omni_model.runtime.launch import run_torchrun, writer_lock
    from omni_model.train.loop import no_training
    from omni_model.train.metrics import read_metrics
    from omni_model.train.settings import TrainSettings

    # the inputs and the output are markers beside their folders
    mcore_dir = Path(snakemake.input.convert).with_suffix("")  # noqa: F821
    marker = Path(snakemake.output.done)  # noqa: F821
    train_dir = marker.with_suffix("")
    shards_dir = Path(snakemake.input.shards).with_suffix("")  # noqa: F821
    settings = TrainSettings(
        hf_dir=str(mcore_dir), init_checkpoint=str(mcore_dir / "checkpoint"), shards=str(shards_dir),
        train_dir=str(train_dir), train=dict(params.train), parallel=dict(params.parallel), data=dict(params.data),
        use_te=bool(params.use_te),
    )
    settings.validate()
    with writer_lock(train_dir, "finetune"):
        train = settings.train
        if train.iters == 0:
            no_training(settings)
        else:
            settings_path = train_dir / "settings.json"
            settings.dump(settings_path)
            check_settings(settings)  # memory planner: refuses a layout that cannot fit train.gpu_memory_gib
            nproc = train.gpus_per_node or train.cpu_procs
            log.info("starting %d rank(s) per node on %d node(s): %d steps", nproc, train.nnodes, train.iters)
            run_torchrun("omni_model.train", ["--settings", str(settings_path)], nproc_per_node=nproc,
                         nnodes=train.nnodes, rdzv_endpoint=train.rdzv_endpoint)
            steps = [r for r in read_metrics(settings.metrics_path) if "loss" in r]
            console_line(f"[finetune] {len(steps)} steps: loss first {steps[0]['loss']:.4f} -> last "
                         f"{steps[-1]['loss']:.4f} (metrics: {settings.metrics_path}, "
                         f"log: {snakemake.log[0]})")  # noqa: F821
    write_marker(marker, f"latest: {(train_dir / 'latest').read_text().strip()}")  # last
