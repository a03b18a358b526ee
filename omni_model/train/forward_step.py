"""One micro-batch of the data pipeline -> the Megatron-Core thinker, in the form mcore's pipeline schedules call.

    from megatron.core.pipeline_parallel import get_forward_backward_func
    losses = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=batches, model=[ddp_model],
                                         num_microbatches=n, seq_length=..., micro_batch_size=..., ...)

`thinker_inputs(batch)` is THE adapter from an `OmniBatch` to the thinker's forward keywords (transformers' keywords
come from `OmniBatch.hf_inputs()` instead; the two differ: mcore wants already-shifted labels, a THD
`PackedSeqParams` instead of an HF attention mask, and a padding mask for MoE routing):

| keyword             | from the batch                                   | used by                                     |
| ------------------- | ------------------------------------------------ | ------------------------------------------- |
| `input_ids`         | `input_ids` [B, S]                               | embedding (first stage)                     |
| `position_ids`      | `position_ids` [3, B, S] MRoPE                   | rotary embedding (every stage)              |
| `packed_seq_params` | `cu_seqlens` / `max_seqlen` (packed), else None  | THD attention per sequence (every stage)    |
| `padding_mask`      | `attention_mask == 0` [B, S], True = padding     | MoE router: pads leave the aux loss (every) |
| `labels`            | `shift_labels` [B, S] (already shifted, -100)    | per-token cross-entropy (last stage)        |
| `loss_mask`         | `loss_mask` [B, S] float                         | `loss_func` (last stage)                    |
| media               | pixel values, grids, audio features              | the towers (first stage only)               |

With parallel.cp > 1 (`model_inputs` -> `context_parallel_inputs`, model.context_parallel): the row is padded so that
every sequence splits into 2 x cp chunks, and positions, labels, loss mask and padding mask are cut to this CP rank's
zig-zag chunks here; the input ids and media stay whole (the towers see whole media, the language model cuts the
merged embeddings). A CP rank's loss sums and label counts cover its chunks: mcore's finalize_model_grads reduces
the count, and DDP the gradients, over DP x CP.

With frozen towers (PerfOptions.step_tower_forward, the default; `step_tower_outputs`): the training step reads its
micro-batches a group at a time (STEP_TOWER_GROUP) and runs each tower ONCE over the group's media (under no_grad: no
tower parameter trains), and forward_step hands each micro-batch its share to the thinker (`tower_outputs`) instead
of its media: the towers' host time per layer call (the launch-bound multimodal step waits for it) is paid once per
group, not per micro-batch. With PerfOptions.tower_lookahead (the default) a run's `StepTowers` also reads the NEXT
step's first group before this step's optimizer update and launches its towers behind this step's backward, so that
host time overlaps GPU work instead of opening the next step.

A packed batch is one THD row: B rows of S tokens are flattened to [1, B*S] (its `cu_seqlens` already count over the
flattened tokens; mcore's THD attention takes batch 1). Every keyword is passed by name: mcore's `Float16Module`
casts only positional inputs to bf16, so the float MRoPE positions stay exact.

Loss contract (`loss_func`, with `TransformerConfig.calculate_per_token_loss=True`, as read in megatron-core 0.16.1
and 0.19.2):

* `loss_func` returns `(loss_sum, num_label_tokens, {"lm loss": [loss_sum, num_label_tokens]})`: the SUM of the
  token losses of this micro-batch. `schedules.forward_step_calc_loss` leaves it unscaled (it divides only when
  calculate_per_token_loss is off), the schedule back-propagates the sum and adds up `num_label_tokens` over the
  micro-batches, DDP sums (does not average) gradients over DP ranks in per-token mode, and `finalize_model_grads`
  broadcasts the token count from the last pipeline stage, all-reduces it over DP x CP and divides every gradient by
  it. So the gradient is that of (sum of all label-token losses of the global batch) / (their count): the mean over
  all label tokens of the global batch, not a mean of per-micro-batch means. The logged loss is the same ratio:
  sum the "lm loss" pairs over micro-batches and DP ranks, divide the first entry by the second.
* MoE aux loss (router `attach_and_log_load_balancing_loss` + `MoEAuxLossAutoScaler`): in per-token mode the
  schedule sets the aux-loss backward scale to the plain loss scale (1 in fp32/bf16), and the router attaches
  `aux_loss * n_routed` where `n_routed` = the routed non-padding tokens of the whole micro-batch (summed over the
  TP x CP ranks that share it: with a padding mask mcore takes the count from its in-place all-reduced per-expert
  counts; WITHOUT one it takes the rank-local row count, so at TP > 1 with sequence parallelism every aux gradient
  would be 1/tp too small. `thinker_inputs` therefore always passes a padding mask, all False when nothing is
  padded; measured: tp2+sp aux/router gradients == tp1). After the division by the global label-token count the
  objective is

      sum_{micro-batch m, DP rank} [ CE_sum_m + coeff * aux_m * n_routed_m ] / N_label

  i.e. each micro-batch's aux loss weighted by its share of routed tokens, and the aux loss weighted against the
  token-mean CE by (routed tokens / label tokens). Prompt tokens are routed but not trained, so the aux loss gets
  a larger effective weight than `coeff` when many tokens are masked from the loss (e.g. 3x when a third of the
  tokens are trained). Padding leaves both counts (it is neither routed, through `padding_mask`, nor trained).
"""

from __future__ import annotations

import dataclasses
import itertools
from functools import partial
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.utils import get_attr_wrapped_model

from ..data.batch import OmniBatch
from ..data.packing import pad_for_context_parallel
from ..model.context_parallel import cp_packed_seq_params, zigzag_plan
from ..model.thinker import MEDIA_KEYS, TowerOutputs


def packed_seq_params_of(batch: OmniBatch) -> Optional[PackedSeqParams]:
    """THD packing parameters of a packed batch (query and key boundaries are the same), None when unpacked."""
    if batch.cu_seqlens is None:
        return None
    cu_seqlens = batch.cu_seqlens.to(torch.int32)
    total = batch.input_ids.numel()
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens must run from 0 to the batch's {total} tokens (B*S), got "
                         f"{int(cu_seqlens[0])}..{int(cu_seqlens[-1])}")
    max_seqlen = int(batch.max_seqlen) if batch.max_seqlen is not None else int(cu_seqlens.diff().max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


def context_parallel_inputs(batch: OmniBatch, media: bool = True) -> dict:
    """`thinker_inputs` of this context-parallel rank (model.context_parallel): the batch padded so that every
    sequence splits into 2 x cp chunks, positions / labels / loss mask / padding mask cut to this rank's zig-zag
    chunks, and the CP packing parameters. The input ids stay whole: the first stage merges the towers' features
    into the full row and the language model then cuts it (the towers see whole media)."""
    from megatron.core import parallel_state

    cp_group = parallel_state.get_context_parallel_group()
    cp, rank = cp_group.size(), cp_group.rank()
    padded = pad_for_context_parallel(batch, cp, parallel_state.get_tensor_model_parallel_world_size())
    inputs = thinker_inputs(padded, media=media)
    plan = zigzag_plan(padded.cu_seqlens.numpy(), cp, rank)
    index = torch.from_numpy(plan.local_index)
    for name in ("labels", "loss_mask", "padding_mask", "position_ids"):
        inputs[name] = inputs[name].index_select(-1, index)
    inputs["packed_seq_params"] = cp_packed_seq_params(plan, cp_group)
    return inputs


def model_inputs(batch: OmniBatch, media: bool = True) -> dict:
    """The thinker's keywords for this rank: `thinker_inputs`, or `context_parallel_inputs` when parallel.cp > 1."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized() and parallel_state.get_context_parallel_world_size() > 1:
        return context_parallel_inputs(batch, media=media)
    return thinker_inputs(batch, media=media)


def thinker_inputs(batch: OmniBatch, media: bool = True) -> dict:
    """Keyword arguments of `Qwen3OmniThinker.forward` for this batch (see the module table).

    `media=False` leaves out the tower inputs (pipeline stages after the first have no towers).
    """
    packed = packed_seq_params_of(batch)
    tokens = dict(input_ids=batch.input_ids, labels=batch.shift_labels, loss_mask=batch.loss_mask,
                  padding_mask=batch.attention_mask == 0)
    position_ids = batch.position_ids
    if packed is not None:  # one THD row of B*S tokens
        tokens = {name: value.reshape(1, -1) for name, value in tokens.items()}
        position_ids = position_ids.reshape(position_ids.shape[0], 1, -1)
    inputs = dict(tokens, position_ids=position_ids, packed_seq_params=packed)
    if media:
        inputs.update({name: getattr(batch, name) for name in MEDIA_KEYS if getattr(batch, name) is not None})
        inputs["host_input_ids"] = tokens["input_ids"]  # stays on the host (HOST_KEYS): the placeholder counts
    return inputs


# what the towers and the multimodal merge read on the host (patch and window layout, placeholder counts): moving
# them to the GPU would make the model read them back (a host sync per micro-batch)
HOST_KEYS = ("image_grid_thw", "video_grid_thw", "audio_feature_lengths", "host_input_ids")


def to_device(inputs: dict, device: torch.device) -> dict:
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, PackedSeqParams):  # every tensor field; self-attention without CP: q and kv bounds are one
            moved = {f.name: move(getattr(value, f.name)) for f in dataclasses.fields(value)
                     if isinstance(getattr(value, f.name), torch.Tensor)}
            if value.cu_seqlens_kv is value.cu_seqlens_q:
                moved["cu_seqlens_kv"] = moved["cu_seqlens_q"]
            return dataclasses.replace(value, **moved)
        return value

    return {name: value if name in HOST_KEYS else move(value) for name, value in inputs.items()}


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """mcore's per-token loss form: (sum of this micro-batch's label-token losses, their count, report)."""
    losses = output_tensor.float().reshape(-1)
    trained = loss_mask.reshape(-1).bool()
    if losses.shape != trained.shape:
        raise ValueError(f"per-token losses {tuple(output_tensor.shape)} and loss_mask {tuple(loss_mask.shape)} "
                         f"differ in size")
    loss_sum = torch.where(trained, losses, torch.zeros_like(losses)).sum()
    num_tokens = trained.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {"lm loss": report}


def clear_moe_aux_loss_scale() -> None:
    """mcore 0.16 keeps the MoE aux-loss backward scale in a class attribute: a backward outside its schedule (an
    evaluation with grads, a parity check) leaves a 0-d tensor there, and the schedule's next set_loss_scale copies a
    [1]-shaped scale into it and fails. The schedule sets it again right after the forward: start from None."""
    MoEAuxLossAutoScaler.main_loss_backward_scale = None


@dataclasses.dataclass(frozen=True)
class WithTowerOutputs:
    """A micro-batch whose media went through the towers at the step's start (`step_tower_outputs`)."""
    batch: OmniBatch
    towers: TowerOutputs


def forward_step(data_iterator, model):
    """mcore `forward_step_func`: the next OmniBatch through the (DDP-wrapped) thinker of this pipeline stage.

    Every stage reads the micro-batch (all need positions, packing and the padding mask; the first also the ids
    and media, the last the labels): the data iterator must yield the same batches on every stage of a pipeline.
    A WithTowerOutputs item (`step_tower_outputs`) brings its tower outputs: the thinker merges them in place of the
    media.
    """
    clear_moe_aux_loss_scale()
    item = next(data_iterator) if data_iterator is not None else None
    batch, towers = (item.batch, item.towers) if isinstance(item, WithTowerOutputs) else (item, None)
    if not isinstance(batch, OmniBatch):
        raise TypeError(f"forward_step needs an OmniBatch from the data iterator on every pipeline stage (positions, "
                        f"packing and the padding mask are used by all stages), got {type(batch).__name__}")
    pre_process = get_attr_wrapped_model(model, "pre_process")
    device = next(model.parameters()).device
    inputs = model_inputs(batch, media=pre_process)
    if towers is not None:  # the media went through the towers already (host_input_ids stay: the placeholder counts)
        inputs = {name: value for name, value in inputs.items() if name not in MEDIA_KEYS}
        inputs["tower_outputs"] = towers
    inputs = to_device(inputs, device)
    output_tensor = model(**inputs)
    return output_tensor, partial(loss_func, inputs["loss_mask"])


# micro-batches whose media go through the frozen towers together: what the towers hold at once (their media, the
# no-grad activations of one forward, the outputs until their micro-batches have run) grows with the group, so a
# step of many micro-batches (gradient accumulation) runs them in groups of this many instead of all at once
STEP_TOWER_GROUP = 2


def step_tower_outputs(model, data_iterator, num_microbatches: int, group: int = STEP_TOWER_GROUP):
    """The step's micro-batches for forward_step, with the towers run once per `group` of them when they are frozen
    (PerfOptions.step_tower_forward; optimizer_step calls this through `StepTowers`, `forward_step.prefetch`).

    mcore's schedule calls the model once per micro-batch, the towers included; but frozen towers do not change
    within a step, so the outputs for several micro-batches can come from ONE forward per tower (thinker.tower_outputs:
    split back per micro-batch at counts from the host grids and the clip lengths the audio tower has on the host
    anyway: no device read of its own). Lazily, a group at a time: when the schedule asks for the first micro-batch of
    a group, its `group` batches are read from `data_iterator` and their towers run; the group's outputs stay on the
    device until its micro-batches have run.
    Anything else (the switch off, a tower trained, no tower on this pipeline stage) gets `data_iterator` back
    unchanged; an item that is not an OmniBatch is passed on as it is (forward_step names it). Context parallelism
    needs nothing more: its padding leaves the media as they are and every CP rank runs the towers on the whole media
    either way."""
    thinker = _frozen_towers_thinker(model)
    if thinker is None or data_iterator is None:
        return data_iterator
    return _grouped_tower_outputs(thinker, data_iterator, num_microbatches, group)


def _grouped_tower_outputs(thinker, data_iterator, num_microbatches: int, group: int):
    device = next(thinker.parameters()).device
    for first in range(0, num_microbatches, group):
        batches = list(itertools.islice(data_iterator, min(group, num_microbatches - first)))
        if not all(isinstance(batch, OmniBatch) for batch in batches):
            yield from batches
            continue
        media = [to_device({name: getattr(batch, name) for name in MEDIA_KEYS if getattr(batch, name) is not None},
                           device) for batch in batches]
        with torch.no_grad():
            towers = thinker.tower_outputs(media)
        yield from (WithTowerOutputs(batch, outputs) for batch, outputs in zip(batches, towers))


class StepTowers:
    """The thinker's `forward_step.prefetch`: one per training run (loop.Run.prefetch), `step_tower_outputs` for
    each step, and with PerfOptions.tower_lookahead the NEXT step's first group read and sent through the frozen
    towers before this step's optimizer update (`read_ahead`).

    Why: the towers' forward is many small kernels whose launches the host cannot issue as fast as the GPU runs them.
    At a step's start the GPU has nothing queued (the previous step ended on the optimizer's host reads), so it idles
    while the host launches them: the host-bound part of a multimodal step. optimizer_step calls `read_ahead` when the
    schedule has launched the step's last backward and before the optimizer's first host read: the GPU still has that
    backward queued, and the host launches the next step's towers behind it instead. The next step's iterator yields
    those items first. Its values are the same (frozen towers do not change in an update; tests/test_step_towers.py).

    The loop decides when not to read ahead: at the last step, and before a checkpoint (the loader's saved state would
    count the batches read ahead as trained, and a resumed run would skip them). `held` names the batches read for
    the next step, which the step's token counts leave to the next (data.TokenCounter.take); `drop` forgets them (a
    benchmark switching its batch list)."""

    def __init__(self, group: int = STEP_TOWER_GROUP):
        self.group = group
        self.ahead: list = []  # the next step's first items, read and (frozen towers) through the towers already

    def __call__(self, model, data_iterator, num_microbatches: int):
        ahead, self.ahead = self.ahead, []
        if len(ahead) > num_microbatches:
            raise ValueError(f"{len(ahead)} micro-batches were read ahead for a step of {num_microbatches}")
        rest = step_tower_outputs(model, data_iterator, num_microbatches - len(ahead), self.group)
        return itertools.chain(ahead, rest) if ahead else rest

    def read_ahead(self, model, data_iterator, num_microbatches: int) -> None:
        """Reads the first group of the next step (of `num_microbatches`) and launches its towers, when the towers
        are frozen and PerfOptions.tower_lookahead is on; else nothing is read."""
        thinker = _frozen_towers_thinker(model)
        if thinker is None or not thinker.tower_lookahead or data_iterator is None or self.ahead:
            return
        count = min(self.group, num_microbatches)
        self.ahead = list(_grouped_tower_outputs(thinker, data_iterator, count, self.group))

    @property
    def held(self) -> list:
        return [item.batch if isinstance(item, WithTowerOutputs) else item for item in self.ahead]

    def drop(self) -> None:
        self.ahead = []


forward_step.prefetch = StepTowers


def _frozen_towers_thinker(model):
    """The thinker inside `model` (DDP) when its towers run once per step: the switch on, at least one tower here
    (the first pipeline stage) and no tower parameter trained (a LoRA adapter inside a tower counts); else None."""
    thinker = get_attr_wrapped_model(model, "step_tower_forward", return_model_obj=True)
    towers = [tower for tower in (thinker.vision_model, thinker.audio_model) if tower is not None]
    if not thinker.step_tower_forward or not towers:
        return None
    if any(param.requires_grad for tower in towers for param in tower.parameters()):
        return None
    return thinker
