"""The training run: resume-or-start, then steps through Megatron-Core's schedule, evaluation, checkpoints, metrics.

    python -m omni_model.train --settings settings.json     # under torchrun (omni_model.runtime.launch)

One step (`step`) = `get_forward_backward_func()` over get_num_microbatches() micro-batches (gradient accumulation;
pipeline schedules when PP > 1), `finalize_model_grads` (DP reduction, 1 / global label tokens), the optimizer step
(clip), the scheduler step; then evaluation, metrics and the checkpoint when due (`_evaluate_log_save`). The forward step (batch -> thinker -> per-token loss sum) is omni_model.train.forward_step.

What differs between the thinker's run and the talker's (`finetune_talker`, train.talker_run) is one `Stage`: the
model build, the forward step, the loaders, the token counter and the FLOP counter. Resume, checkpoints, evaluation,
metrics and the step itself are this module's, for both.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import checkpointing as ckpt
from .metrics import FlopCounter, MetricsLog, memory_gib, moe_aux_loss, peak_tflops, read_metrics
from .settings import TrainSettings


@dataclass
class Stage:
    """The parts of a training run that depend on what is trained; the thinker's by default (`thinker_stage`)."""
    name: str  # log prefix: finetune | finetune_talker
    build: Callable  # (settings, load_initial_weights: bool) -> build.Training
    forward_step: Callable  # mcore forward_step_func; its loss reports carry "lm loss" = [loss sum, count]
    train_loader: Callable  # (settings, restore_state or None) -> savable Energon loader
    val_loader: Callable  # (settings) -> iterable of micro-batches
    counter: Callable  # (batch iterator) -> iterator with take() -> counts (data.TokenCounter)
    flops: Callable  # (settings) -> callable(counts) -> {part: model FLOPs of the step}
    check_data: Optional[Callable] = None  # (settings) -> None, rank 0, before anything is built


def thinker_stage(forward_step: Optional[Callable] = None) -> Stage:
    from .build import build_training
    from .data import TokenCounter, check_shards, train_loader, val_loader

    if forward_step is None:
        from .forward_step import forward_step
    return Stage(name="finetune", build=lambda settings, load: build_training(settings, load_initial_weights=load),
                 forward_step=forward_step, train_loader=train_loader, val_loader=val_loader, counter=TokenCounter,
                 flops=lambda settings: FlopCounter(settings.hf_dir, settings.train), check_data=check_shards)


def no_training(settings: TrainSettings) -> None:
    """train.iters 0: the converted checkpoint is the result (`latest` names it); an empty metrics file."""
    train_dir = Path(settings.train_dir)
    train_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_latest(train_dir, Path(settings.init_checkpoint))
    settings.metrics_path.write_text("")
    print(f"[finetune] train.iters is 0: no training; latest -> {ckpt.read_latest(train_dir)}", flush=True)


def _broadcast(value):
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _is_rank0() -> bool:
    return torch.distributed.get_rank() == 0


def _reduced_loss(losses_reduced: list, key: str = "lm loss") -> tuple[float, float]:
    """(sum, count) of the `key` entries of all micro-batches, summed over DP x CP ranks (a CP rank's entries
    cover its own chunks of the micro-batch) and given to every PP stage (only the last stage computes losses)."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64)
    for item in losses_reduced:
        value = item[key]
        value = torch.stack([torch.as_tensor(v).detach().reshape(()) for v in value]) \
            if isinstance(value, (list, tuple)) else value.detach().reshape(-1)
        total += value.double().cpu()[:2]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    total = total.to(device)
    torch.distributed.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:  # non-last stages hold zeros
        torch.distributed.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return float(total[0]), float(total[1])


def _dp_sum(values: list) -> list:
    from megatron.core import parallel_state as ps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, group=ps.get_data_parallel_group())
    return tensor.tolist()


def val_batches(settings: TrainSettings, val_loader: Callable) -> list:
    """The first train.eval_iters micro-batches of the val split: read once, the same batches at every evaluation
    (eval losses of different steps compare like with like)."""
    batches = []
    if settings.train.eval_interval:
        for batch in val_loader(settings):
            batches.append(batch)
            if len(batches) >= settings.train.eval_iters:
                break
    return batches


def evaluate(settings: TrainSettings, training, forward_step: Callable, batches: list) -> Optional[float]:
    """Token-mean loss over the val batches (every DP rank its own), forward only."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    training.model.eval()
    with torch.no_grad():
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[training.model],
            num_microbatches=len(batches), seq_length=settings.train.seq_len,
            micro_batch_size=settings.train.micro_batch_size, forward_only=True) if batches else []
    training.model.train()
    loss_sum, count = _reduced_loss(losses)  # every rank takes part, even with an empty val split
    return loss_sum / count if count else None


def _start(settings: TrainSettings, digest: str, name: str = "finetune") -> Optional[Path]:
    """Rank 0 picks the checkpoint to resume from (or None), removes half-written saves and rebuilds the metrics
    file up to that checkpoint (Snakemake deleted it before rerunning the job). Another run's checkpoints stay until
    this run's first checkpoint is complete (checkpointing.clear_other_runs): a run that fails first destroys none."""
    resume = None
    if _is_rank0():
        train_dir = Path(settings.train_dir)
        train_dir.mkdir(parents=True, exist_ok=True)
        resume = ckpt.choose_resume(train_dir, digest, settings.train.iters)
        removed = ckpt.clear_interrupted_saves(train_dir)
        if removed:
            print(f"[{name}] removed the half-written saves of an interrupted run: {removed}", flush=True)
        if resume is None:
            _set_tb_aside(train_dir)
            settings.metrics_path.write_text("")
        else:
            shutil.copyfile(resume / ckpt.METRICS, settings.metrics_path)
        print(f"[{name}] settings digest {digest}: " +
              (f"resuming from {resume}" if resume else f"starting from {settings.init_checkpoint}"), flush=True)
    resume = _broadcast(str(resume) if resume else None)
    return Path(resume) if resume else None


def _set_tb_aside(train_dir: Path) -> None:
    """A fresh run's TensorBoard events start in an empty tb/; the previous run's wait in tb.previous/ until this
    run's first checkpoint (kept there if the run fails first; an older set-aside copy is kept over a failed run's)."""
    tb, previous = train_dir / "tb", train_dir / ckpt.TB_PREVIOUS
    if previous.exists():
        shutil.rmtree(tb, ignore_errors=True)
    elif tb.exists():
        os.replace(tb, previous)


@dataclass
class Run:
    """What the steps of one run share."""
    settings: TrainSettings
    training: object  # build.Training
    forward_step: Callable
    digest: str
    loader: object  # the savable Energon train loader (its state goes into every checkpoint)
    batches: object  # the stage's counter over the loader (data.TokenCounter for the thinker)
    evaluation: list  # the fixed val micro-batches
    flops: Callable  # counts -> {part: FLOPs}
    peak: Optional[float]  # peak TFLOP/s per device (MFU), None when unknown
    log: MetricsLog
    stage: Optional[Stage] = None  # None: the thinker's (tests and benches that build a Run themselves)
    # the forward step's prefetch of this run (`forward_step.prefetch()`: the thinker's frozen towers, StepTowers),
    # kept across steps for its look-ahead; None: optimizer_step makes one per step (no look-ahead)
    prefetch: Optional[object] = None


def train(settings: TrainSettings, forward_step: Optional[Callable] = None, stage: Optional[Stage] = None) -> None:
    """One training run (the thinker's unless `stage` says otherwise; `forward_step` replaces the thinker's)."""
    settings.validate()
    stage = stage or thinker_stage(forward_step)
    if settings.train.iters == 0:
        no_training(settings)
        return
    from .build import init_training_parallel

    init_training_parallel(settings)
    if _is_rank0() and stage.check_data is not None:
        stage.check_data(settings)
    digest = _broadcast(settings.digest() if _is_rank0() else None)
    resume = _start(settings, digest, stage.name)
    training, start, loader_state = _build_or_resume(settings, resume, stage)
    if start >= settings.train.iters:  # a finished run: restore `latest`, no step
        if _is_rank0():
            ckpt.write_latest(Path(settings.train_dir), resume)
        _summary(settings, stage.name)
        return
    run = _prepare(settings, stage, training, digest, loader_state, start)
    for iteration in range(start + 1, settings.train.iters + 1):
        record = step(run, iteration)
        _evaluate_log_save(run, record)
    run.log.close()
    _summary(settings, stage.name)


def _build_or_resume(settings: TrainSettings, resume: Optional[Path], stage: Stage) -> tuple:
    """(training objects, iteration to continue after, Energon loader state): from the initial weights, or from the
    checkpoint `resume` (model, optimizer, scheduler, RNG; resharded when it was written at another layout)."""
    training = stage.build(settings, resume is None)
    if resume is None:
        return training, 0, None
    info = ckpt.load_training_checkpoint(resume, training)
    if not info["same_layout"] and _is_rank0():
        print(f"[{stage.name}] resumed at another layout (saved at {info['saved_layout']}): model, optimizer and "
              f"scheduler resharded; " + ("the data stream continues" if info["same_data_parallel"] else
              "the data stream restarts (other data-parallel size)"), flush=True)
    return training, info["iteration"], info["loader_state"]


def _prepare(settings: TrainSettings, stage: Stage, training, digest: str, loader_state, start: int) -> Run:
    """The loaders, the FLOP counter and the metrics sink of a run that continues after step `start`."""
    t = settings.train
    loader = stage.train_loader(settings, loader_state)
    log = MetricsLog(settings.metrics_path, Path(settings.train_dir) / "tb", t.iters, start, enabled=_is_rank0())
    run = Run(settings=settings, stage=stage, training=training, forward_step=stage.forward_step, digest=digest,
              loader=loader, batches=stage.counter(iter(loader)), evaluation=val_batches(settings, stage.val_loader),
              flops=stage.flops(settings), peak=peak_tflops(t.peak_tflops), log=log,
              prefetch=new_prefetch(stage.forward_step))
    training.model.train()
    return run


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def new_prefetch(forward_step) -> Optional[object]:
    """A fresh prefetch of `forward_step` (its `prefetch` attribute: a factory), or None when it has none."""
    make = getattr(forward_step, "prefetch", None)
    return make() if make is not None else None


def optimizer_step(model, optimizer, scheduler, forward_step, data_iterator, num_microbatches: int, seq_length: int,
                   micro_batch_size: int, prefetch=None, next_microbatches: int = 0) -> tuple:
    """The training step proper, in Megatron's train_step order: zero the DDP grad buffers AND the optimizer's
    param.grad (after a step param.grad aliases main_grad; left set, autograd would accumulate into it in place and
    DDP's hook would add it to main_grad a second time), forward/backward of `num_microbatches` micro-batches through
    mcore's schedule, the optimizer step (clipping), the scheduler step. Returns (the schedule's per-micro-batch loss
    reports, updated, grad norm). The tests call this same function. A forward step with a `prefetch` attribute gets
    the step's data iterator through `prefetch` (the run's, else a fresh one) first (the thinker's:
    forward_step.StepTowers, frozen towers run once over a group of micro-batches). With the run's `prefetch` and
    `next_microbatches` > 0 (the next step's size) the prefetch reads the next step's first micro-batches after the
    schedule and before the optimizer's host reads (StepTowers.read_ahead: their towers launched behind this step's
    backward); a step-local prefetch never reads ahead (what it read would be lost with it)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.zero_grad_buffer()
    optimizer.zero_grad()
    step_prefetch = prefetch if prefetch is not None else new_prefetch(forward_step)
    source = data_iterator
    if step_prefetch is not None:
        data_iterator = step_prefetch(model, data_iterator, num_microbatches)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=[model],
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=False)
    if prefetch is not None and next_microbatches:
        prefetch.read_ahead(model, source, next_microbatches)
    updated, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    return losses, updated, grad_norm


def step(run: Run, iteration: int) -> dict:
    """One optimizer step through mcore's schedule over get_num_microbatches() micro-batches; its metrics record."""
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from .build import current_lr

    t, training = run.settings.train, run.training
    clear_aux_losses_tracker()  # the step's aux loss is its own batches' (any forward with grad before it tracks too)
    lr = current_lr(training.optimizer)  # the LR this step's update uses
    _synchronize()
    began = time.perf_counter()
    # the next step's first micro-batches are read during this one unless a checkpoint comes between (its loader
    # state would count them as trained) or this is the last step
    ahead = get_num_microbatches() if iteration < t.iters and not _save_due(t, iteration) else 0
    losses, updated, grad_norm = optimizer_step(
        training.model, training.optimizer, training.scheduler, run.forward_step, run.batches,
        get_num_microbatches(), t.seq_len, t.micro_batch_size, prefetch=run.prefetch, next_microbatches=ahead)
    _synchronize()
    seconds = time.perf_counter() - began
    record = {"step": iteration, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
              "updated": bool(updated)}
    return dict(record, **_step_metrics(run, losses, seconds))


def _step_metrics(run: Run, losses: list, seconds: float) -> dict:
    """Loss, MoE aux loss, token and sample counts (the samples the task encoder skipped too), model FLOPs by part,
    TFLOP/s and MFU per device, memory of a step (every rank takes part in the reductions)."""
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    loss_sum, label_tokens = _reduced_loss(losses)
    # further loss terms a forward step reports ([value, count] per micro-batch, e.g. the talker's two CE terms)
    extra = {key.replace(" ", "_"): _reduced_loss(losses, key) for key in (losses[0] if losses else {})
             if key != "lm loss"}
    aux = moe_aux_loss(run.training.thinker.config, get_num_microbatches())
    seen = run.batches.take(run.prefetch.held if run.prefetch is not None else ())
    flops = run.flops(seen)
    parts = sorted(flops)
    tokens, samples, padded, skipped, *part_flops = _dp_sum(
        [seen["tokens"], seen["samples"], seen["padded"], seen["skipped"], *(flops[p] for p in parts)])
    tflops = sum(part_flops) / seconds / 1e12 / torch.distributed.get_world_size()
    return {
        "loss": loss_sum / max(label_tokens, 1), **{k: s / max(c, 1) for k, (s, c) in extra.items()},
        "moe_aux_loss": aux, "label_tokens": int(label_tokens),
        "tokens": int(tokens), "padded_tokens": int(padded), "samples": int(samples),
        "skipped_samples": int(skipped), "step_s": seconds, "tokens_per_s": tokens / seconds,
        **{f"flops_{p}": f for p, f in zip(parts, part_flops)},
        "tflops": tflops, "mfu": (tflops / run.peak) if run.peak else None, "mem_gib": memory_gib(),
    }


def _evaluate_log_save(run: Run, record: dict) -> None:
    """After a step: the evaluation when due, the step line, metrics.jsonl / TensorBoard, the checkpoint when due."""
    t, iteration = run.settings.train, record["step"]
    if t.eval_interval and iteration % t.eval_interval == 0:
        record["eval_loss"] = evaluate(run.settings, run.training, run.forward_step, run.evaluation)
    if iteration % t.log_interval == 0 or iteration == t.iters:
        run.log.progress(record)
    run.log.write(record)
    if _save_due(t, iteration):
        saved = ckpt.save_training_checkpoint(Path(run.settings.train_dir), iteration, run.training, run.loader,
                                              run.digest, run.settings.metrics_path, keep=t.keep_checkpoints)
        if _is_rank0():
            print(f"[{run.stage.name if run.stage else 'finetune'}] saved {saved}", flush=True)


def _save_due(t, iteration: int) -> bool:
    """A checkpoint is written after step `iteration` (every save_interval steps, and after the last)."""
    return bool(t.save_interval and iteration % t.save_interval == 0) or iteration == t.iters


def _summary(settings: TrainSettings, name: str = "finetune") -> None:
    if not _is_rank0():
        return
    records = [r for r in read_metrics(settings.metrics_path) if "loss" in r]
    if records:
        first, last = records[0], records[-1]
        skipped = sum(r.get("skipped_samples", 0) for r in records)
        print(f"[{name}] loss first {first['loss']:.4f} (step {first['step']}) -> last {last['loss']:.4f} "
              f"(step {last['step']}); {skipped} sample(s) skipped by the task encoder; "
              f"latest -> {ckpt.read_latest(Path(settings.train_dir))}", flush=True)


def settings_main(prog: str, settings_type, run: Callable, argv=None) -> None:
    """A training process's entry point (the rule scripts launch it): `--settings JSON` -> `settings_type.load` ->
    `run(settings)`, the process groups torn down afterwards whatever happened."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=sys.modules[run.__module__].__doc__.splitlines()[0])
    parser.add_argument("--settings", required=True, type=Path, help=f"settings JSON ({settings_type.__name__} fields)")
    args = parser.parse_args(argv)
    settings = settings_type.load(args.settings)
    try:
        run(settings)
    finally:
        from omni_model.runtime.parallel import destroy_parallel

        destroy_parallel()


def main(argv=None) -> None:
    settings_main("python -m omni_model.train", TrainSettings, train, argv)
