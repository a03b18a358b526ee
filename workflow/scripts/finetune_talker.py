"""Rule `finetune_talker`: write the talker run's settings and start `python -m omni_model.train.talker_run` under
torchrun (nproc as finetune's), or, when there is nothing to train (train_talker.iters 0, shards without spoken
answers, a LoRA thinker run), say so in the log and on the console: the export then carries the source talker, whose
speech was not re-aligned to the tuned thinker. The marker `train_talker.done` is written last (rules/finetune.smk)."""

from pathlib import Path

from omni_model.runtime.logs import console_line, stage_logging
from omni_model.runtime.publish import write_marker

params = snakemake.params  # noqa: F821
with stage_logging(snakemake.log[0], "finetune_talker") as log:  # noqa: F821
    from omni_model.runtime.launch import run_torchrun, writer_lock
    from omni_model.train.checkpointing import LATEST, read_latest
    from omni_model.train.metrics import read_metrics
    from omni_model.train.talker_run import TalkerSettings, not_trained_reason, talker_train_section

    marker = Path(snakemake.output.done)  # noqa: F821  (inputs and output are markers beside their folders)
    train_dir = marker.with_suffix("")
    mcore_dir = Path(snakemake.input.convert).with_suffix("")  # noqa: F821
    thinker = read_latest(Path(snakemake.input.train).with_suffix(""))  # noqa: F821
    settings = TalkerSettings(
        hf_dir=str(mcore_dir), init_checkpoint=str(thinker), shards=str(Path(snakemake.input.shards).with_suffix("")),  # noqa: F821
        train_dir=str(train_dir), train=talker_train_section(params.train, params.train_talker),
        parallel=dict(params.parallel), data=dict(params.data), use_te=bool(params.use_te),
        talker_init=str(Path(snakemake.input.hf_manifest).parent), talker=dict(params.train_talker))  # noqa: F821
    reason = not_trained_reason(settings, params.train)
    train_dir.mkdir(parents=True, exist_ok=True)
    with writer_lock(train_dir, "finetune_talker"):
        if reason:
            (train_dir / LATEST).unlink(missing_ok=True)  # export reads `latest`: no talker run is the result
            line = f"[finetune_talker] no talker training ({reason}): the export carries the source talker; its " \
                   f"speech was NOT re-aligned to the tuned thinker"
            log.info(line)
            console_line(line)
        else:
            settings.validate()
            settings_path = train_dir / "settings.json"
            settings.dump(settings_path)
            train = settings.train
            nproc = train.gpus_per_node or train.cpu_procs
            log.info("starting %d rank(s) per node on %d node(s): %d talker steps on the thinker of %s", nproc,
                     train.nnodes, train.iters, thinker)
            run_torchrun("omni_model.train.talker_run", ["--settings", str(settings_path)], nproc_per_node=nproc,
                         nnodes=train.nnodes, rdzv_endpoint=train.rdzv_endpoint)
            steps = [r for r in read_metrics(settings.metrics_path) if "loss" in r]
            console_line(f"[finetune_talker] {len(steps)} steps: loss first {steps[0]['loss']:.4f} -> last "
                         f"{steps[-1]['loss']:.4f} (metrics: {settings.metrics_path}, log: {snakemake.log[0]})")  # noqa: F821
write_marker(marker, f"talker: {reason or 'trained'}")  # last
