"""Shared pieces of the training tests (also imported by tests/dist/train_layout_grads.py): demo samples encoded by
the real data encoder, the thinker wrapped in mcore DDP, and one forward/backward through mcore's schedule with our
forward_step (per-token loss, finalize_model_grads), returning the loss, the MoE aux losses and every gradient."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def encode_demo_samples(hf_dir, out_dir: Path, n_records: int = 24, seed: int = 5) -> dict:
    """One encoded sample of each kind from the generated demo set: image+audio, video, text only."""
    from omni_model.data.demo import generate_demo
    from omni_model.data.encoder import OmniEncoder, media_from_paths
    from omni_model.data.formats import LIST_KEY, load_raw

    records, _, _ = load_raw(generate_demo(Path(out_dir), n_records, seed=seed))
    encoder = OmniEncoder(hf_dir, max_seq_len=2048)

    def first(predicate):
        for record in records:
            if predicate({kind: len(record.get(key, [])) for kind, key in LIST_KEY.items()}):
                try:
                    return encoder.encode(record, media_from_paths(record))
                except Exception:  # noqa: BLE001 - a deliberately broken demo sample: take the next one
                    continue
        raise AssertionError("the demo set has no such sample")

    return {
        "image_audio": first(lambda n: n["image"] and n["audio"]),
        "video": first(lambda n: n["video"]),
        "text": first(lambda n: not any(n.values())),
        "pad_id": encoder.pad_id,
    }


def encode_long_audio_sample(hf_dir, out_dir: Path, seconds: float, seed: int = 7):
    """A conversation about one generated `seconds`-long 16 kHz tone, encoded by the real data encoder (a long audio
    sample: ~13 audio tokens a second)."""
    from omni_model.data.demo import _Gen
    from omni_model.data.encoder import OmniEncoder, media_from_paths

    gen = _Gen(Path(out_dir), seed)
    gen.media.mkdir(parents=True, exist_ok=True)
    name, description = gen.audio("long-audio", seconds, 16000)
    record = {"id": "long-audio", "audios": [str(gen.media / name)],
              "messages": [{"role": "user", "content": "<audio>Describe the sound."},
                           {"role": "assistant", "content": f"I hear {description}."}]}
    encoder = OmniEncoder(hf_dir, max_seq_len=8192)
    return encoder.encode(record, media_from_paths(record))


def packed_micro_batches(samples: dict, rows: list, pad_to_multiple: int = 1) -> list:
    """One packed micro-batch (a single THD row) per entry of `rows`, each a list of `samples` keys (e.g.
    [["image_audio", "text"], ["video"]]) as encode_demo_samples names them."""
    from omni_model.data.batch import collate
    from omni_model.data.packing import pack

    return [collate([pack([samples[name] for name in row])], pad_id=samples["pad_id"], packed=True,
                    pad_to_multiple=pad_to_multiple) for row in rows]


def ddp_thinker(thinker):
    """`thinker` in mcore DDP with the schedule hooks set, as the training loop does (fp32 on CPU)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    config = thinker.config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=thinker)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    return model


def aux_losses() -> dict:
    """The MoE aux losses mcore tracked since the last clear ({name: per-layer values}), then clear them."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    values = {name: entry["values"].clone() for name, entry in get_moe_layer_wise_logging_tracker().items()}
    clear_aux_losses_tracker()
    return values


def forward_backward(model, batches: list, forward_only: bool = False) -> dict:
    """One step's forward/backward of `batches` (the micro-batches of this rank) through mcore's schedule.

    Returns the loss as the mean over all label tokens of the step (summed over micro-batches and DP ranks), the
    token count, and the aux losses. Gradients are left in the DDP grad buffers (param.main_grad).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from omni_model.train.forward_step import forward_step

    if not forward_only:
        model.zero_grad_buffer()
    aux_losses()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model], num_microbatches=len(batches),
        forward_only=forward_only, **_shape(batches))
    return _step_loss(reports)


def _shape(batches: list) -> dict:
    return {"seq_length": max(b.input_ids.shape[1] for b in batches),
            "micro_batch_size": batches[0].input_ids.shape[0]}


def _step_loss(reports: list) -> dict:
    """The step's loss as the mean over all its label tokens (summed over micro-batches and DP ranks), the token
    count, and the aux losses."""
    from megatron.core import parallel_state

    total = torch.zeros(2, dtype=torch.float64)
    for report in reports:  # empty on pipeline stages other than the last
        total += report["lm loss"].double().cpu()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:  # the loss lives on the last stage
        torch.distributed.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    # a context-parallel rank's losses cover its own chunks of each micro-batch: sum over DP x CP
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return {"loss": float(total[0] / total[1]), "num_tokens": int(total[1]), "aux": aux_losses()}


def train_step(model, optimizer, scheduler, batches: list) -> dict:
    """One optimizer step of `batches` (this rank's micro-batches) through the training loop's own step function
    (omni_model.train.loop.optimizer_step), with the step's loss."""
    from omni_model.train.forward_step import forward_step
    from omni_model.train.loop import optimizer_step

    aux_losses()
    reports, updated, grad_norm = optimizer_step(model, optimizer, scheduler, forward_step, iter(batches),
                                                 len(batches), **_shape(batches))
    return dict(_step_loss(reports), updated=updated, grad_norm=grad_norm)


def gradients(model) -> dict:
    """{parameter name: gradient} of this rank (the DDP main_grad after finalize_model_grads)."""
    return {name: param.main_grad.detach().clone() for name, param in model.module.named_parameters()
            if param.requires_grad}


def grad_state_dict(model) -> dict:
    """The thinker's state dict with every parameter replaced by its gradient: the same keys (and expert weight{e}
    naming hooks) as the weights, so the mapping can turn gradients into full HF-named tensors like weights."""
    thinker = model.module
    params = [p for p in thinker.parameters()]
    saved = [p.data for p in params]
    try:
        for param in params:
            grad = getattr(param, "main_grad", None)
            param.data = grad.view_as(param) if grad is not None else torch.zeros_like(param)
        return {k: v.detach().clone() for k, v in thinker.state_dict().items() if not k.endswith("_extra_state")}
    finally:
        for param, data in zip(params, saved):
            param.data = data


def to_hf_names(rank_state_dicts: dict, hf_dir, tconfig=None) -> dict:
    """{HF name: full tensor} from {RankCoord: thinker state dict} of every rank of the current layout (`tconfig`:
    the LLM's TransformerConfig when its layer placement is not the default, e.g. an uneven pipeline split)."""
    from omni_model.convert.mapping import Mapper, SafetensorsReader
    from omni_model.model.language_model import current_layout

    mapper = Mapper(SafetensorsReader(hf_dir).config, current_layout(), tconfig=tconfig)
    return dict(mapper.iter_mcore_to_hf(rank_state_dicts))


def switch_stats(logits: torch.Tensor, keep: torch.Tensor, top_k: int):
    """One router over its non-padding tokens: f_i = share of the top-k assignments that go to expert i (sums to 1),
    P_i = mean router probability of expert i (the Switch load-balancing loss is E * sum_i f_i P_i)."""
    import torch.nn.functional as F

    probs = logits[keep].float().softmax(-1)
    assigned = F.one_hot(probs.topk(top_k, dim=-1).indices, logits.shape[-1]).sum(1).float()
    return assigned.sum(0) / (top_k * len(probs)), probs.mean(0)


def scheduled_lr(step: int, train: dict, mult: float = 1.0) -> float:
    """The LR training step `step` (1-based) uses, written out: linear warmup train.lr * step / lr_warmup_iters, then
    cosine from train.lr to train.min_lr at the last step (train.iters); `mult`: a group's train.lr_mult_*."""
    lr, min_lr, warmup = train["lr"] * mult, train["min_lr"] * mult, train["lr_warmup_iters"]
    if step <= warmup:
        return lr * step / warmup
    ratio = (step - warmup) / (train["iters"] - warmup)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (lr - min_lr)
