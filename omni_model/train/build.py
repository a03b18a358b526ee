"""The training objects of one rank, all Megatron-Core's own: the thinker at the configured layout, frozen parts,
`DistributedDataParallel`, `get_megatron_optimizer` (per-tower LR through param-group overrides) and
`OptimizerParamScheduler`, plus the micro-batch calculator.

    parallel = init_training_parallel(settings)
    model, optimizer, scheduler = build_training(settings)

GPU: bf16 parameters, fp32 grads reduction, the distributed optimizer. CPU (gloo): fp32 and the plain optimizer
(mcore's bf16 and distributed optimizer assert CUDA tensor types; shared/notes/mcore-on-cpu.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..model.options import DEFAULT, PerfOptions
from ..schema import TrainConfig
from .adam import torch_adams
from .settings import TrainSettings

# Which top-level module of the thinker each freeze / LR switch addresses (names as in thinker.named_parameters()).
PARTS = {"llm": "language_model.", "vision": "vision_model.", "audio": "audio_model."}

# train.recompute -> TransformerConfig fields (selective = mcore's default module list: the core attention).
RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


@dataclass
class Training:
    model: torch.nn.Module  # mcore DistributedDataParallel around the thinker (model.module)
    optimizer: object  # MegatronOptimizer (ChainedOptimizer: dense + expert params)
    scheduler: object  # OptimizerParamScheduler
    dtype: torch.dtype
    lora: Optional[dict] = None  # LoRA run: {"lora": train.lora, "base_digest": ...}, recorded in its checkpoints

    @property
    def thinker(self):
        return self.model.module


def init_training_parallel(settings: TrainSettings) -> None:
    """torch.distributed + mcore groups for the configured layout, then the micro-batch calculator."""
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
        init_num_microbatches_calculator,
    )

    from omni_model.runtime.parallel import init_parallel

    p, t = settings.parallel, settings.train
    init_parallel(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, cp=p.cp, seed=t.seed)
    world = torch.distributed.get_world_size()
    if world != settings.world_size:
        raise RuntimeError(f"started on {world} ranks but the settings ask for {settings.world_size} "
                           f"(train.gpus_per_node / cpu_procs x nnodes)")
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(
        rank=torch.distributed.get_rank(), rampup_batch_size=None, global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size, data_parallel_size=parallel_state.get_data_parallel_world_size())


def training_dtype(settings: TrainSettings) -> torch.dtype:
    return torch.bfloat16 if settings.on_gpu else torch.float32


def model_config_overrides(settings: TrainSettings) -> dict:
    """TransformerConfig fields the training run sets on the LLM."""
    t = settings.train
    overrides = {
        # the loss is a token SUM per micro-batch; mcore's schedule + finalize_model_grads divide by the global
        # number of label tokens (all micro-batches, all DP ranks): the mean over every label token of the step
        "calculate_per_token_loss": True,
        **RECOMPUTE[t.recompute],
    }
    if t.moe_aux_loss_coeff is not None:
        overrides["moe_aux_loss_coeff"] = float(t.moe_aux_loss_coeff)
    overrides.update(settings.layout.split_overrides())  # parallel.first_stage_layers
    return overrides


def build_thinker_for_training(settings: TrainSettings, options: PerfOptions = DEFAULT):
    from omni_model.model.thinker import build_thinker

    # perform_initialization stays on although a checkpoint fills the weights next: mcore 0.16.1 tags TP-split
    # weights (tensor_model_parallel, partition_dim) only inside its init functions, and without the tags the grad
    # norm, clipping and the SP/TP grad reductions treat them as replicated (seen: tp2 grad norm 1.41 vs tp1 1.59)
    thinker = build_thinker(settings.hf_dir, dtype=training_dtype(settings), use_te=settings.use_te, options=options,
                            config_overrides=model_config_overrides(settings))
    if settings.layout.pp > 1:
        allow_variable_seq_lengths(thinker.config)
    thinker.language_model.loss_chunk_tokens = settings.train.loss_chunk_tokens  # model.chunked_loss
    return thinker


def allow_variable_seq_lengths(config) -> None:
    """Let the pipeline stages exchange each activation's shape before sending it: packed micro-batches differ in
    length (mcore's `variable_seq_lengths`; only pipeline_parallel/p2p_communication reads it, at run time).

    Set on the built config, not passed to the build, on purpose: TransformerConfig.__post_init__ (megatron-core
    0.16.1 to 0.19.2) refuses variable_seq_lengths with the allgather token dispatcher for every layout, because that
    dispatcher all-gathers the tokens over the TP x EP group with equal-size collectives, which break when those
    ranks hold micro-batches of different lengths at the same time. build_transformer_config picks allgather only at
    ep = 1, where the TP x EP group is the TP group: its ranks always run the same micro-batch, so the lengths are
    equal and the refusal does not apply (checked below). The ways around it cost time: the alltoall dispatcher at
    ep = 1 re-sorts the permuted tokens (~0.7 ms per MoE layer and micro-batch at the 30B shape, H200), and padding
    every micro-batch to train.seq_len computes the packing's unused remainder."""
    if config.moe_token_dispatcher_type == "allgather" and config.expert_model_parallel_size > 1:
        raise ValueError("variable sequence lengths with the allgather dispatcher need expert_model_parallel_size 1 "
                         "(its all-gather spans TP x EP ranks that may hold micro-batches of different lengths)")
    config.variable_seq_lengths = True


def freeze(thinker: torch.nn.Module, train) -> dict:
    """requires_grad False on the frozen parts (before DDP and the optimizer: no grad buffer, no optimizer state).
    `train`: the train section (TrainConfig or mapping). Returns parameter counts {part: (trainable, frozen)}."""
    train = TrainConfig.of(train)
    return freeze_parts(thinker, PARTS, {part: bool(getattr(train, f"freeze_{part}")) for part in PARTS})


def freeze_parts(module: torch.nn.Module, prefixes: dict, frozen: dict) -> dict:
    """requires_grad False on every parameter under a frozen part's name prefix(es) (one or a tuple per part);
    parameter counts {part: (trainable, frozen)}. The thinker's and the talker's freeze switches both go through it."""
    counts = {}
    for part, prefix in prefixes.items():
        params = [p for name, p in module.named_parameters() if name.startswith(prefix)]
        for param in params:
            param.requires_grad_(not frozen[part])
        n = sum(p.numel() for p in params)
        counts[part] = (0, n) if frozen[part] else (n, 0)
    return counts


def add_lora(thinker: torch.nn.Module, settings: TrainSettings) -> int:
    """train.lora: adapters around the targeted linears, everything else frozen (requires_grad False before DDP and
    the optimizer: they hold adapter parameters only, the base stays in the training dtype, bf16 on GPU)."""
    from omni_model.model.lora import grads_through_full_recompute, inject_lora

    count = inject_lora(thinker, settings.lora, seed=settings.train.seed)
    if settings.train.recompute == "full":
        grads_through_full_recompute(thinker)
    total = torch.tensor([count], device="cuda" if settings.on_gpu else "cpu")
    torch.distributed.all_reduce(total)  # a pipeline stage may hold no targeted module; the whole model must
    if int(total) == 0:
        raise RuntimeError(f"train.lora.targets {list(settings.lora.targets)} match no module of this model")
    return count


def optimizer_config(settings: TrainSettings):
    from megatron.core.optimizer import OptimizerConfig

    t, on_gpu = settings.train, settings.on_gpu
    return OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad,
        bf16=on_gpu, params_dtype=training_dtype(settings), use_distributed_optimizer=on_gpu,
    )


def lr_overrides(config, train) -> dict:
    """mcore param-group overrides: the standard no-weight-decay group (biases, 1-d params) plus a scaled peak/min LR
    for a tower whose train.lr_mult_* is not 1 (OptimizerParamScheduler reads max_lr/min_lr per group). `train`:
    TrainConfig or mapping."""
    train = TrainConfig.of(train)
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    overrides = get_standard_config_overrides(config)
    for part in ("vision", "audio"):
        mult = float(getattr(train, f"lr_mult_{part}"))
        if mult != 1.0:
            # DDP-wrapped names are module.<part>_model.*
            key = ParamKey(name=(f"*{PARTS[part]}*",))
            overrides[key] = ParamGroupOverride(max_lr=config.lr * mult, min_lr=config.min_lr * mult)
    return overrides


def build_scheduler(optimizer, train):
    """`train`: the train section (TrainConfig or mapping)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    train = TrainConfig.of(train)

    iters = max(int(train.iters), 1)
    warmup = int(train.lr_warmup_iters)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=train.lr, min_lr=train.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(iters, warmup + 1), lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay, end_wd=train.weight_decay, wd_incr_steps=iters,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=True)
    # mcore sets the LR of num_steps 0 (init_lr, 0 in a warmup) and the loop steps the scheduler after each update,
    # so step 1 would train at LR 0 and the warmup end a step late: count the step about to run instead. Step k then
    # trains at lr * k / warmup, and the decay reaches min_lr at the last step (its state carries num_steps on resume).
    scheduler.step(increment=1)
    return scheduler


def build_training(settings: TrainSettings, load_initial_weights: bool = True, load_base=None,
                   options: PerfOptions = DEFAULT) -> Training:
    """The thinker (weights from settings.init_checkpoint), frozen parts, DDP, optimizer, scheduler. With train.lora
    the base weights are always loaded (`load_base(thinker)` if given, e.g. from HF safetensors in a test), before
    the adapters are added. `options`: the performance switches (model.options.PerfOptions)."""
    from .checkpointing import load_model_weights

    thinker = build_thinker_for_training(settings, options)
    if settings.lora and load_base is not None:
        load_base(thinker)
    elif load_initial_weights or settings.lora:  # LoRA: the base weights are never in a training checkpoint
        load_model_weights(thinker, settings.init_checkpoint)
    if settings.lora:
        add_lora(thinker, settings)
    else:
        freeze(thinker, settings.train)
    return wrap_for_training(thinker, settings, options, lora=lora_run_record(settings))


def wrap_for_training(module: torch.nn.Module, settings: TrainSettings, options: PerfOptions = DEFAULT,
                      lora: Optional[dict] = None) -> Training:
    """A built model (its trainable parameters chosen) in mcore's DDP, with get_megatron_optimizer and the LR
    scheduler of `settings.train`: the thinker's training objects, and the talker's (train.talker_step)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    from .grad_buffer import FirstWriteDDP

    config = module.config
    # mcore's MoE metrics tracker is process-global and sizes its per-layer tensors by the first model that records:
    # a second model in the process (the talker after a thinker, a notebook, a test) with more MoE layers would index
    # past them (IndexError in moe_logging's record)
    destroy_moe_metrics_tracker()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=settings.on_gpu,
        check_for_nan_in_grad=True)
    ddp = FirstWriteDDP if options.first_write_grads else DistributedDataParallel
    model = ddp(config=config, ddp_config=ddp_config, module=module)
    # mcore's schedule calls these: grad reduction across DP, SP/TP-replicated params, embeddings, 1/num_tokens
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync

    opt_config = optimizer_config(settings)
    optimizer = get_megatron_optimizer(opt_config, [model], config_overrides=lr_overrides(opt_config, settings.train),
                                       use_gloo_process_groups=not settings.on_gpu)
    if settings.on_gpu:
        use_fused_adam(optimizer)
        if options.fold_grad_scale:
            FoldedGradScale(model, optimizer)
    scheduler = build_scheduler(optimizer, settings.train)
    return Training(model=model, optimizer=optimizer, scheduler=scheduler, dtype=training_dtype(settings), lora=lora)


def lora_run_record(settings: TrainSettings) -> Optional[dict]:
    """What a LoRA run's checkpoints record: the adapter settings and the digest of the base they apply to."""
    from .checkpointing import base_digest

    if not settings.lora:
        return None
    return {"lora": settings.train.lora.as_dict(), "base_digest": base_digest(settings.init_checkpoint)}


def use_fused_adam(optimizer) -> None:
    """torch's fused (one-kernel) Adam step in place of the multi-tensor one mcore builds without TE/Apex: the same
    update (bf16 H200, 30B-A3B shapes: the optimizer was ~87 ms of a step's GPU time in ~10 kernel passes over every
    fp32 master weight and moment). mcore has no switch for it; torch reads `fused` per param group at each step.
    Its step counters live on the device (tensors on the parameters' device: checkpointing.unshare_adam_steps)."""
    for adam in torch_adams(optimizer):
        adam.defaults.update(fused=True, foreach=False)
        for group in adam.param_groups:
            group.update(fused=True, foreach=False)


class NonFiniteGradError(FloatingPointError):
    """A training step whose gradients hold a NaN or Inf: raised before the optimizer touches a parameter."""


class FoldedGradScale:
    """The optimizer step with the grads' two scalings done inside fused Adam instead of as passes over the buffers.

    In mcore's step, with per-token loss, `finalize_model_grads` multiplies every grad buffer by 1/label tokens (a
    pass over all fp32 main grads). Clipping then multiplies them again by max_norm / norm, when that is below 1. Adam
    then reads them a third time. torch's fused Adam divides each grad by its `grad_scale` tensor inside its own kernel,
    so both factors go there: the buffers are left raw, the norm is taken on the raw grads and scaled (a norm is
    linear in a scalar factor), and the clip coefficient comes from that norm exactly as in mcore. The H200 text step
    spent 12.0 + 9.4 ms on the two passes (bench/RESULTS.md, session 5). Fused Adam only: torch's other Adams refuse a
    grad_scale.

    Installed on the DDP model and the mcore optimizer by `build_training` (GPU). `optimizer.step()` keeps mcore's
    contract: (updated, grad norm of the scaled grads, zeros in grad: not counted).

    A NaN or Inf in any grad makes the norm (all-reduced over every rank that holds grads) non-finite: the step stops
    there with NonFiniteGradError, before any parameter moves. That makes DDP's own NaN check redundant (a norm of
    every grad bucket and two host reads each, per step: 4.1 ms of the H100 text step's kernels, bench/RESULTS.md
    issue 27), so it is switched off here."""

    def __init__(self, model, optimizer):
        self.optimizer = optimizer
        self.adams = torch_adams(optimizer)
        self.token_scale = 1.0
        model.scale_gradients = self.record_token_scale  # what finalize_model_grads calls with 1 / num_tokens
        model.ddp_config.check_for_nan_in_grad = False  # the buffers' bucket groups read this shared config per step
        optimizer.step = self.step

    def record_token_scale(self, scaling_factor) -> None:
        # kept as given (mcore 0.19: a device tensor, 1 / max(num_tokens, 1)): read in step, beside the grad norm's
        # own host read, not here (finalize_model_grads no longer reads num_tokens on the host)
        self.token_scale = scaling_factor

    @torch.no_grad()
    def step(self):
        optimizer, token_scale = self.optimizer, float(self.token_scale)
        self.token_scale = 1.0  # a step whose grads finalize did not scale (no token count) keeps them as they are
        optimizer.grad_norms_by_group = {}  # mcore's step resets the per-group norms it reports (0.19)
        if optimizer.prepare_grads():  # inf/nan found (fp16 loss scaling): skip, as mcore does
            return False, None, None
        grad_norm = optimizer.get_grad_norm() * token_scale
        if not math.isfinite(grad_norm):
            raise NonFiniteGradError(
                f"the gradients' norm is {grad_norm} (a NaN or Inf in the loss or a gradient): the step stopped before "
                "any parameter was updated; the last checkpoint is intact (a lower train.lr or the data of this step "
                "are where to look)")
        factor = token_scale
        if optimizer.config.clip_grad > 0.0:
            clip_coeff = optimizer.config.clip_grad / (grad_norm + 1.0e-6)  # mcore's clip_grad_by_total_norm_fp32
            factor *= min(clip_coeff, 1.0)
        for adam in self.adams:
            # a rank's shard of a param group can be empty (distributed optimizer): any parameter gives the device
            param = next((p for group in adam.param_groups for p in group["params"]), None)
            if param is not None:
                adam.grad_scale = torch.full((), 1.0 / factor, dtype=torch.float32, device=param.device)
        return optimizer.step_with_ready_grads(), grad_norm, None


def current_lr(optimizer) -> float:
    from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

    return get_canonical_lr_for_logging(optimizer.param_groups)
