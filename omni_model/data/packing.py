"""Sequence packing: several encoded sequences in one row of at most ``budget`` tokens.

Selection is first-fit decreasing over a buffer of samples (deterministic for a given buffer); a packed row keeps
per-sequence boundaries (``seq_lens`` -> ``cu_seqlens`` at collation) and per-sequence position ids (each sequence's
MRoPE positions start at 0, so attention and rotary embeddings see exactly what they see unpacked, given a
varlen/THD attention that respects ``cu_seqlens``).
"""

from __future__ import annotations

import numpy as np

from .batch import EncodedSample


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


def _first_sequences(samples: list[EncodedSample]) -> list[int]:
    """Index in the packed row of each sample's first sequence."""
    starts, total = [], 0
    for sample in samples:
        starts.append(total)
        total += len(sample.seq_lens)
    return starts
