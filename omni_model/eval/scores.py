"""Loss and next-token accuracy of every sample of a split, by the Megatron-Core thinker at the configured layout.

    python -m omni_model.eval --settings settings.json --checkpoint DIR --split val --out scores.jsonl  # torchrun

The training's own pieces: `init_training_parallel` (the layout), `build_thinker_for_training` + `load_model_weights`
(any torch_dist checkpoint: convert's or a training one, resharded to this layout), the training task encoder on the
shards, `thinker_inputs` and mcore's schedule with `forward_only=True` (pipeline stages included). Unlike training, a
micro-batch is one unpacked sample (per-sample numbers need no unpacking) and the thinker returns logits, so the
last stage scores both the cross-entropy (the model's own vocab-parallel loss) and the argmax of every answer token.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from ..train.settings import TrainSettings


def vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Argmax over the full vocabulary of logits [..., V/tp] split over the tensor-parallel ranks."""
    from megatron.core import parallel_state as ps

    local_max, local_arg = logits.float().max(dim=-1)
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return local_arg
    group = ps.get_tensor_model_parallel_group()
    maxes = [torch.empty_like(local_max) for _ in range(tp)]
    args = [torch.empty_like(local_arg) for _ in range(tp)]
    torch.distributed.all_gather(maxes, local_max.contiguous(), group=group)
    torch.distributed.all_gather(args, local_arg.contiguous(), group=group)
    best = torch.stack(maxes).argmax(dim=0)  # the first rank holding the maximum, like a plain argmax
    vocab_per_rank = logits.shape[-1]
    return torch.stack(args).gather(0, best[None])[0] + best * vocab_per_rank


def sample_scores(model, batch, labels: torch.Tensor, loss_mask: torch.Tensor, logits: torch.Tensor):
    """mcore loss_func on the last stage: one record per real sample of the micro-batch (rows of one sample each):
    summed answer-token loss, answer tokens, correctly predicted answer tokens."""
    from megatron.core.utils import get_attr_wrapped_model

    language_model = get_attr_wrapped_model(model, "language_model")
    losses = language_model.compute_language_model_loss(labels, logits.transpose(0, 1).contiguous()).float()
    correct = (vocab_parallel_argmax(logits) == labels) & loss_mask.bool()
    trained = loss_mask.float()
    rows = []
    for row, ids in enumerate(batch.sample_ids):
        if getattr(batch, "repeat", False):  # a copy that only keeps the ranks in step
            continue
        rows.append({"id": ids[0], "loss_sum": float((losses[row] * trained[row]).sum()),
                     "tokens": int(trained[row].sum()), "correct": int(correct[row].sum())})
    count = trained.sum().to(torch.int)
    return torch.zeros((), device=logits.device), count, {"samples": rows}


def score_step(data_iterator, model):
    """mcore forward_step_func: the training forward (thinker_inputs) without labels, so the last stage gets logits."""
    from megatron.core.utils import get_attr_wrapped_model

    from ..train.forward_step import to_device, clear_moe_aux_loss_scale, thinker_inputs

    clear_moe_aux_loss_scale()
    batch = next(data_iterator)
    device = next(model.parameters()).device
    inputs = to_device(thinker_inputs(batch, media=get_attr_wrapped_model(model, "pre_process")), device)
    labels, loss_mask = inputs.pop("labels"), inputs.pop("loss_mask")
    output = model(**inputs)
    return output, partial(sample_scores, model, batch, labels, loss_mask)


def split_batches(settings: TrainSettings, split: str, limit: Optional[int] = None) -> list:
    """This data-parallel rank's micro-batches of the split (one sample each, unpacked; in order for val, in the
    order Energon's train dataset shuffles them for `train`, eval.data's split; the first `limit` when given), padded
    with repeats to the most any rank holds: expert-parallel and tensor-parallel collectives need every rank in step."""
    from omni_model.data.task_encoder import build_loader

    from ..train.data import task_encoder, worker_config

    loader = build_loader(Path(settings.shards), task_encoder(settings), split=split, batch_size=1,
                          packing_buffer_size=None, worker_config=worker_config(), repeat=False)
    batches = list(itertools.islice(loader, limit))
    most = torch.tensor([len(batches)], dtype=torch.int64,
                        device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    if not batches and int(most):
        raise RuntimeError(f"the {split} split has fewer samples than data-parallel ranks: evaluate on fewer ranks")
    while len(batches) < int(most):
        copy = dataclasses.replace(batches[-1])
        copy.repeat = True
        batches.append(copy)
    return batches


def score_batches(thinker, batches: list, seq_length: int) -> list[dict]:
    """Per-sample scores of `thinker` (built for this rank's layout, weights in place) on this rank's `batches`
    (split_batches): mcore's schedule, forward only; every rank gets the same list, in sample-id order."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    thinker.eval()
    with torch.no_grad():
        reports = get_forward_backward_func()(
            forward_step_func=score_step, data_iterator=iter(batches), model=[thinker],
            num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=1,
            forward_only=True) if batches else []
    keep = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    mine = [row for report in reports for row in report["samples"]] if keep else []
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return sorted((row for rows in everyone for row in rows), key=lambda row: row["id"])


def score_checkpoint(settings: TrainSettings, checkpoint: Path, split: str) -> list[dict]:
    """Per-sample scores of `checkpoint` on `split` (every rank gets the same list, in sample-id order)."""
    from ..train.build import build_thinker_for_training, init_training_parallel
    from ..train.checkpointing import load_model_weights
    from ..train.data import check_shards

    init_training_parallel(settings)
    check_shards(settings)  # the shards were encoded with this model's tokenizer and the same media settings
    thinker = build_thinker_for_training(settings)
    load_model_weights(thinker, checkpoint)
    return score_batches(thinker, split_batches(settings, split), settings.data.max_seq_len)


def main(argv=None) -> None:
    import argparse

    from omni_model.runtime.parallel import destroy_parallel

    parser = argparse.ArgumentParser(prog="python -m omni_model.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--settings", required=True, type=Path, help="settings JSON (TrainSettings fields)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="torch_dist checkpoint dir to evaluate")
    parser.add_argument("--split", default="val", help="split of the shards (val; train for eval.data's shards)")
    parser.add_argument("--out", required=True, type=Path, help="per-sample scores (jsonl), written by rank 0")
    args = parser.parse_args(argv)
    try:
        rows = score_checkpoint(TrainSettings.load(args.settings), args.checkpoint, args.split)
        if torch.distributed.get_rank() == 0:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    finally:
        destroy_parallel()
