"""The talker's training forward: the loss transformers' talker trains with, on our mcore talker.

    loss = CE(first code group, incl. the codec EOS that ends the speech)            transformers' talker forward
           + predictor_weight x CE(groups 1..G-1 of every frame, code predictor)   its code predictor, per group

Both terms are token means over the micro-batch (transformers' `ForCausalLMLoss` with `labels`: the mean over the
labelled positions; the predictor term: the mean over frames x groups, each group g from head g-1 at predictor
position g, as `generate` runs the predictor). mcore's schedule averages the micro-batch losses (and DDP the data-
parallel ranks): the talker runs with `calculate_per_token_loss` off, so a step's loss is the mean of its micro-batch
losses, as a plain loop that accumulates `loss / micro_batches` computes it.

The batch holds what `Qwen3OmniMoeForConditionalGeneration.generate` gives the talker, teacher-forced: per position
the thinker's token embedding (text_projection) or, at multimodal positions, the accepted layer's hidden state
(hidden_projection), plus codec codes (the prompt's special ids in group 0; at speech positions the previous frame's
G codes, summed as `generate` feeds them back). Building it from the tuned thinker is the `finetune_talker` stage's
job; this module takes it as given.

    step = TalkerForwardStep(predictor_weight=0.3)
    losses = get_forward_backward_func()(forward_step_func=step, data_iterator=iter(batches), model=[ddp_talker], ...)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

IGNORE = -100


@dataclass
class TalkerBatch:
    thinker_embeds: torch.Tensor  # [B, S, Ht] the thinker's token embedding at each talker position
    multimodal_mask: torch.Tensor  # [B, S] bool: positions taking the accepted layer's hidden state instead
    thinker_hidden: torch.Tensor  # [n_multimodal, Ht] those hidden states, row-major (b, s) order
    codec_codes: torch.Tensor  # [B, S, G] long, codes added to the input, -1 = none
    position_ids: torch.Tensor  # [3, B, S] MRoPE ids (or [B, S])
    labels: torch.Tensor  # [B, S] first-group target of each position (already shifted), -100 = none
    frame_positions: torch.Tensor  # [N] flat b * S + s of the positions whose hidden state predicts frame n
    frame_codes: torch.Tensor  # [N, G] the codes of frame n (frame_codes[n, 0] is labels at frame_positions[n])
    packed_seq_params: Optional[object] = None  # THD packing (B == 1), mcore's PackedSeqParams

    def to(self, device) -> "TalkerBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return TalkerBatch(**moved)


@dataclass
class TalkerLoss:
    first: torch.Tensor  # mean CE of the first code group over the labelled positions
    residual: torch.Tensor  # mean CE of groups 1..G-1 over the frames
    total: torch.Tensor  # first + predictor_weight * residual
    first_tokens: int
    residual_tokens: int


def check_batch(batch: TalkerBatch) -> None:
    """Bad input is an error naming the mismatch (a silent misalignment would train codes on the wrong states)."""
    labelled = batch.labels.reshape(-1).index_select(0, batch.frame_positions)
    if not torch.equal(labelled, batch.frame_codes[:, 0]):
        raise ValueError("talker batch: frame_codes[:, 0] must be the first-group label at frame_positions "
                         "(the position whose hidden state predicts the frame)")
    n_mm = int(batch.multimodal_mask.sum())
    if batch.thinker_hidden.shape[0] != n_mm:
        raise ValueError(f"talker batch: {n_mm} multimodal positions but {batch.thinker_hidden.shape[0]} hidden states")


def talker_loss(talker, batch: TalkerBatch, predictor_weight: float) -> TalkerLoss:
    """The training loss of one micro-batch on `talker` (model.talker.Qwen3OmniTalker, any TP/EP layout)."""
    check_batch(batch)
    labelled = batch.labels != IGNORE
    inputs = talker.inputs_embeds(batch.thinker_embeds, batch.codec_codes, batch.multimodal_mask, batch.thinker_hidden)
    out = talker(inputs, batch.position_ids, labels=torch.where(labelled, batch.labels, 0),
                 packed_seq_params=batch.packed_seq_params, frame_positions=batch.frame_positions,
                 frame_codes=batch.frame_codes)
    first_tokens = int(labelled.sum())
    first = (out.first * labelled).sum() / max(first_tokens, 1)
    residual = out.residual.mean() if out.residual is not None and out.residual.numel() else first.new_zeros(())
    return TalkerLoss(first=first, residual=residual, total=first + predictor_weight * residual,
                      first_tokens=first_tokens, residual_tokens=int(out.residual.numel()) if out.residual is not None
                      else 0)


class TalkerForwardStep:
    """mcore's `forward_step_func` for the talker: the next TalkerBatch from the iterator -> (loss, loss_func)."""

    def __init__(self, predictor_weight: float):
        self.predictor_weight = float(predictor_weight)

    def __call__(self, data_iterator, model):
        from .forward_step import clear_moe_aux_loss_scale

        clear_moe_aux_loss_scale()  # an earlier backward outside a schedule in this process (the talker is MoE too)
        batch = next(data_iterator)
        talker = getattr(model, "module", model)  # mcore's DDP forwards to its module; its grad hooks sit on the params
        loss = talker_loss(talker, batch.to(next(talker.parameters()).device), self.predictor_weight)

        def loss_func(total: torch.Tensor):
            # [value, 1] pairs: train.loop sums them over micro-batches and data-parallel ranks and divides (the mean
            # of the micro-batch means, the loss this step trains on); clones: the schedule scales the loss in place
            def pair(value):
                return torch.stack([value.detach().clone().float().reshape(()), value.new_ones((), dtype=torch.float)])

            return total, {"lm loss": pair(total), "first loss": pair(loss.first), "predictor loss": pair(loss.residual)}

        return loss.total, loss_func


def talker_config_overrides(train) -> dict:
    """TransformerConfig fields a talker training run sets: activation recompute, and the MoE aux-loss coefficient
    when train.moe_aux_loss_coeff is given (transformers' talker adds no aux loss unless `output_router_logits`).
    No per-token loss: the talker's loss is the mean of two means (module docstring)."""
    from ..schema import TrainConfig
    from .build import RECOMPUTE

    train = TrainConfig.of(train)  # the typed section, or a mapping of it
    overrides = dict(RECOMPUTE[train.recompute])
    if train.moe_aux_loss_coeff is not None:
        overrides["moe_aux_loss_coeff"] = float(train.moe_aux_loss_coeff)
    return overrides


def build_talker_training(settings, load_weights=None, options=None):
    """The talker's training objects (after train.build.init_training_parallel): the talker at the configured layout,
    `load_weights(talker)` (e.g. convert.mapping.load_hf_into_talker from an HF dir), then mcore DDP,
    get_megatron_optimizer and the LR scheduler exactly as the thinker's (train.build.wrap_for_training)."""
    from ..model.options import DEFAULT
    from ..model.talker import build_talker
    from .build import training_dtype, wrap_for_training

    options = options or DEFAULT
    talker = build_talker(settings.hf_dir, dtype=training_dtype(settings), use_te=settings.use_te, options=options,
                          config_overrides=talker_config_overrides(settings.train))
    if load_weights is not None:
        load_weights(talker)
    return wrap_for_training(talker, settings, options)
