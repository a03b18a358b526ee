"""Energon loaders of the training run over `results/data/shards` (train split: savable, packed, repeating; val split:
one deterministic pass per evaluation).

Data-parallel ranks read different samples; the tensor/pipeline ranks of one DP replica read the same ones: only the
DP coordinates go into Energon's WorkerConfig (rank = DP rank, world size = DP size), so all ranks of a replica
shuffle and pack identically.
"""

from __future__ import annotations

from pathlib import Path

from .settings import TrainSettings


class TokenCounter:
    """Wraps a batch iterator and counts what passes through (the forward step pulls the batches itself): real
    (non-padding) tokens, label tokens, samples, conversation lengths and media sizes (for the model FLOPs).
    `take()` returns the counts of the batches read since the last call; `take(held)` leaves out `held`, the last
    batches read, for the NEXT step already (the frozen towers' look-ahead, forward_step.StepTowers), which the next
    call counts: a step's counts are always its own batches'."""

    def __init__(self, iterator):
        self.iterator = iterator
        # (id, counts) of each batch read and not yet taken: counted as it is read, so that a step of many
        # micro-batches does not keep its batches (their media) alive until the step's end
        self._read: list = []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.iterator)
        self._read.append((id(batch), _batch_counts(batch)))
        return batch

    def take(self, held=()) -> dict:
        held = list(held)
        split = len(self._read) - len(held)
        if split < 0 or any(read_id != id(batch) for (read_id, _), batch in zip(self._read[split:], held)):
            raise ValueError(f"the {len(held)} batch(es) held for the next step are not the last ones read")
        counted, self._read = self._read[:split], self._read[split:]
        total = {"tokens": 0, "trained": 0, "samples": 0, "padded": 0, "seq_lens": [], "vision_grids": [],
                 "audio_frames": [], "skipped": 0}
        for _, counts in counted:
            for key, value in counts.items():
                total[key] += value  # numbers add, lists extend
        return total


def _batch_counts(batch) -> dict:
    """One micro-batch's share of TokenCounter's counts."""
    return {"tokens": int(batch.num_tokens), "trained": int(batch.num_trained),
            "samples": sum(len(row) for row in batch.sample_ids), "padded": int(batch.input_ids.numel()),
            "seq_lens": _sequence_lengths(batch),
            "vision_grids": [tuple(row) for grid in (batch.image_grid_thw, batch.video_grid_thw) if grid is not None
                             for row in grid.tolist()],
            "audio_frames": _audio_frames(batch),
            "skipped": int(sum((getattr(batch, "skipped", None) or {}).values()))}


def _sequence_lengths(batch) -> list:
    """Lengths of the real conversations of a micro-batch (packed: from cu_seqlens; padded: per row)."""
    if batch.cu_seqlens is not None:
        bounds = batch.cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        real = int(batch.num_tokens)
        out, total = [], 0
        for length in lengths:  # right padding forms the trailing segments of each row
            if total >= real:
                break
            out.append(length)
            total += length
        return out
    return [int(n) for n in batch.attention_mask.sum(dim=1).tolist()]


def _audio_frames(batch) -> list:
    """Valid mel frames of every audio clip of a micro-batch."""
    if batch.audio_feature_lengths is not None:
        return [int(n) for n in batch.audio_feature_lengths.reshape(-1).tolist()]
    if batch.feature_attention_mask is not None:
        return [int(n) for n in batch.feature_attention_mask.sum(-1).tolist()]
    return []


def task_encoder(settings: TrainSettings):
    from megatron.core import parallel_state

    from omni_model.data.media import VIDEO_SETTINGS
    from omni_model.data.task_encoder import OmniTaskEncoder

    data = settings.data
    media = {k: getattr(data, k) for k in VIDEO_SETTINGS}
    # sequence parallelism splits the sequence over TP ranks: rows must divide evenly
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return OmniTaskEncoder(Path(settings.hf_dir), max_seq_len=int(data.max_seq_len),
                           pack_budget=settings.train.seq_len if settings.train.packing else None,
                           use_audio_in_video=bool(data.use_audio_in_video), pad_to_multiple=tp,
                           media_overrides=media)


def worker_config(num_workers: int = 0):
    from megatron.core import parallel_state
    from megatron.energon import WorkerConfig

    return WorkerConfig(rank=parallel_state.get_data_parallel_rank(),
                        world_size=parallel_state.get_data_parallel_world_size(), num_workers=num_workers,
                        data_parallel_group=parallel_state.get_data_parallel_group())


def check_shards(settings: TrainSettings) -> None:
    """Refuse shards written with other encoder settings (max_seq_len, media, tokenizer) than this run's task encoder
    encodes with: the data package's check against the settings the shards stage recorded."""
    from omni_model.data.shards import check_shard_settings

    check_shard_settings(Path(settings.shards), task_encoder(settings).encoder.settings())


def train_loader(settings: TrainSettings, restore_state=None, encoder=None):
    """The savable train loader (micro-batches of train.micro_batch_size rows); restore_state continues a stream.
    `encoder`: another task encoder than `task_encoder(settings)` (the talker run's spoken-only one)."""
    from omni_model.data.task_encoder import build_loader, restore_loader

    t = settings.train
    kwargs = dict(split="train", batch_size=t.micro_batch_size,
                  packing_buffer_size=t.packing_buffer_size if t.packing else None,
                  worker_config=worker_config(settings.data_workers), shuffle_buffer_size=t.shuffle_buffer_size,
                  repeat=True)
    encoder = encoder or task_encoder(settings)
    if restore_state is None:
        return build_loader(Path(settings.shards), encoder, **kwargs)
    return restore_loader(Path(settings.shards), encoder, restore_state, **kwargs)


def val_loader(settings: TrainSettings, encoder=None):
    """A fresh pass over the val split (same micro-batch size and packing as training). Shards without val samples
    (the split's samples were all dropped, or data.val_fraction is 0) are refused by name, not by Energon's assert."""
    from omni_model.data.shards import split_tars
    from omni_model.data.task_encoder import build_loader

    t = settings.train
    if not split_tars(Path(settings.shards), "val"):
        raise ValueError(f"train.eval_interval = {t.eval_interval}, but the shards at {settings.shards} have no val "
                         f"samples (data.val_fraction 0, or every val sample dropped: see drops.jsonl there); raise "
                         f"data.val_fraction or set train.eval_interval: 0")
    return build_loader(Path(settings.shards), encoder or task_encoder(settings), split="val", batch_size=t.micro_batch_size,
                        packing_buffer_size=t.packing_buffer_size if t.packing else None,
                        worker_config=worker_config(), repeat=False)
