"""Sequence packing: several encoded sequences in one row of at most ``budget`` tokens.

Selection is first-fit decreasing over a buffer of samples (deterministic for a given buffer); a packed row keeps
per-sequence boundaries (``seq_lens`` -> ``cu_seqlens`` at collation) and per-sequence position ids (each sequence's
MRoPE positions start at 0, so attention and rotary embeddings see exactly what they see unpacked, given a
varlen/THD attention that respects ``cu_seqlens``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .batch import EncodedSample
from .template import IGNORE_INDEX


def select_packs(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped into packs whose total length <= budget (first-fit decreasing). Each index appears once;
    a single sequence longer than the budget is its own pack (the encoder already refuses those over max_seq_len)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    room: list[int] = []
    for index in order:
        for slot, free in enumerate(room):
            if lengths[index] <= free:
                packs[slot].append(index)
                room[slot] -= lengths[index]
                break
        else:
            packs.append([index])
            room.append(budget - lengths[index])
    return packs


def _cat(arrays: list) -> np.ndarray | None:
    present = [a for a in arrays if a is not None and len(a)]
    return np.concatenate(present) if present else None


def pack(samples: list[EncodedSample]) -> EncodedSample:
    """Concatenate sequences (and their media, in order) into one row."""
    if len(samples) == 1:
        return samples[0]
    first = samples[0]
    return EncodedSample(
        __key__="+".join(s.__key__ for s in samples),
        __restore_key__=first.__restore_key__,
        __subflavors__=first.__subflavors__,
        __sources__=tuple(src for s in samples for src in (s.__sources__ or ())),
        sample_ids=[sid for s in samples for sid in s.sample_ids],
        input_ids=np.concatenate([s.input_ids for s in samples]),
        labels=np.concatenate([s.labels for s in samples]),
        position_ids=np.concatenate([s.position_ids for s in samples], axis=1),
        seq_lens=[n for s in samples for n in s.seq_lens],
        pixel_values=_cat([s.pixel_values for s in samples]),
        image_grid_thw=_cat([s.image_grid_thw for s in samples]),
        pixel_values_videos=_cat([s.pixel_values_videos for s in samples]),
        video_grid_thw=_cat([s.video_grid_thw for s in samples]),
        video_second_per_grid=_cat([s.video_second_per_grid for s in samples]),
        input_features=[f for s in samples for f in s.input_features],
        audio_feature_lengths=_cat([s.audio_feature_lengths for s in samples]),
        talker_codes=[codes for s in samples for codes in s.talker_codes],
        talker_turns=[(first_sequence + sequence, turn) for s, first_sequence in zip(samples, _first_sequences(samples))
                      for sequence, turn in s.talker_turns],
    )


# -- context parallelism: every packed sequence in 2 x cp equal chunks (omni_model.model.context_parallel) --------

def padded_lengths(lengths, cp: int, tp: int = 1) -> list:
    """Each sequence length rounded up to a multiple of 2 x cp, plus a trailing padding segment (a multiple of
    2 x cp) when the row is not a multiple of 2 x cp x tp (sequence parallelism splits a rank's tokens over tp)."""
    unit = 2 * cp
    out = [-(-n // unit) * unit for n in lengths]
    remainder = sum(out) % (unit * tp)
    if remainder:
        out.append(unit * tp - remainder)
    return out


def pad_for_context_parallel(batch, cp: int, tp: int = 1):
    """A packed OmniBatch as one row whose sequences (padding segments included) all split into 2 x cp chunks.

    Pad tokens go at the END of each sequence (the batch's pad id, position 0, no label, attention_mask 0 so the
    routers count them as padding): causal attention keeps them out of every real token's output. Media and the
    counts (num_tokens, num_trained) are unchanged. The batch itself is left as it is."""
    if batch.cu_seqlens is None:
        raise ValueError("context parallelism needs packed batches (train.packing: true): it splits each packed "
                         "sequence over the CP ranks by its cu_seqlens")
    if batch.pad_id is None:
        raise ValueError("the batch has no pad_id (data.batch.collate records it): context parallelism pads with it")
    bounds = batch.cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    targets = padded_lengths(lengths, cp, tp)
    source = np.concatenate([np.arange(a, b) for a, b in zip(bounds, bounds[1:])])
    real = np.zeros(sum(targets), dtype=bool)  # True where a token of the batch goes
    start = 0
    for index, target in enumerate(targets):
        if index < len(lengths):
            real[start:start + lengths[index]] = True
        start += target
    where = torch.from_numpy(np.flatnonzero(real))
    take = torch.from_numpy(source)

    def spread(flat: torch.Tensor, fill) -> torch.Tensor:  # [..., T] -> [..., T'] with `fill` in the new slots
        out = flat.new_full((*flat.shape[:-1], len(real)), fill)
        out[..., where] = flat.index_select(-1, take)
        return out[..., None, :] if flat.dim() == 2 else out[None]

    total = batch.input_ids.numel()
    return dataclasses.replace(
        batch,
        input_ids=spread(batch.input_ids.reshape(total), batch.pad_id),
        labels=spread(batch.labels.reshape(total), IGNORE_INDEX),
        shift_labels=spread(batch.shift_labels.reshape(total), IGNORE_INDEX),
        loss_mask=spread(batch.loss_mask.reshape(total), 0),
        attention_mask=spread(batch.attention_mask.reshape(total), 0),
        position_ids=spread(batch.position_ids.reshape(batch.position_ids.shape[0], total), 0),
        cu_seqlens=torch.from_numpy(np.concatenate([[0], np.cumsum(targets)]).astype(np.int32)),
        max_seqlen=max(targets))


def _first_sequences(samples: list[EncodedSample]) -> list[int]:
    """Index in the packed row of each sample's first sequence."""
    starts, total = [], 0
    for sample in samples:
        starts.append(total)
        total += len(sample.seq_lens)
    return starts
