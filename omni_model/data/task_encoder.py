"""The Energon task encoder that feeds training, and loader helpers (with exact-resume state).

Pipeline per sample (Energon stages): WebDataset parts -> :class:`~omni_model.data.sample.OmniSample` (the shards'
``.nv-meta/sample_loader.py``: conversation JSON + canonical media members) -> ``encode_sample``
(:meth:`~omni_model.data.encoder.OmniEncoder.encode_canonical`: 16 kHz FLAC audio and pre-sampled video frames read
with soundfile/PIL, no resampling, no video container; template, labels, pad expansion, media tensors, MRoPE
positions) -> optional packing (``select_samples_to_pack`` / ``pack_selected_samples`` when the
dataset is built with ``packing_buffer_size``) -> ``batch`` (:func:`~omni_model.data.batch.collate` ->
:class:`~omni_model.data.batch.OmniBatch`). Spoken answers' codec codes (the shards' ``speech<k>.npy`` members) ride
along as ``talker_codes`` / ``talker_turns`` (None in a batch without speech), for the talker stage; the thinker's
fields are the same with or without them.

Over-long samples (more than ``max_seq_len`` tokens), media the encoder cannot use and any other per-sample encoding
failure are skipped with one warning line naming the sample (no traceback) and counted per reason (``SKIP_REASONS``):
in :attr:`OmniTaskEncoder.skipped` (per worker process) and on the next batch
(``OmniBatch.skipped``, the skips since that worker's previous batch) so the training loop can sum them over workers and
ranks. The shards stage already removed such samples, so a non-zero count means the shards were written with other
limits (``omni_model.data.shards.check_shard_settings`` refuses such shards before training).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from megatron.energon import (
    SkipSample,
    TaskEncoder,
    WorkerConfig,
    get_savable_loader,
    get_train_dataset,
    get_val_dataset,
    stateless,
)

from megatron.energon.errors import SYSTEM_EXCEPTIONS, FatalSampleError

from .batch import EncodedSample, OmniBatch, collate
from .encoder import OmniEncoder, OverLongSample, ShardFormatError
from .media import MediaError, error_text
from .packing import pack, select_packs
from .sample import OmniSample

log = logging.getLogger(__name__)

# why a sample was skipped: over max_seq_len, media the encoder cannot use (MediaError), any other encoding failure
SKIP_REASONS = ("over_long", "decode", "encode")


class OmniTaskEncoder(TaskEncoder[OmniSample, EncodedSample, OmniBatch, OmniBatch]):
    """Qwen3-Omni task encoder.

    Args:
        hf_dir: checkpoint folder (tokenizer, chat template, preprocessor_config.json, config.json).
        max_seq_len: longest sequence; also the packing budget unless ``pack_budget`` is given.
        pack_budget: tokens per packed row (used when the dataset is built with ``packing_buffer_size``).
        use_audio_in_video: interleave each video's audio track with its frames (Omni's audio-in-video).
        pad_to_multiple: right-pad rows to a multiple of this (e.g. TP*CP*2 for sequence/context parallel).
        media_overrides: MediaConfig fields (video_fps, video_min_pixels, ...).
    """

    decoder = None  # media are read by OmniEncoder.encode_canonical, from the canonical members
    max_failures_in_a_row = 100  # undecodable or unencodable samples in a row that stop training (see _skip)

    def __init__(self, hf_dir: Path, max_seq_len: int = 4096, pack_budget: Optional[int] = None,
                 use_audio_in_video: bool = False, pad_to_multiple: int = 1, media_overrides: Optional[dict] = None):
        super().__init__()
        self.encoder = OmniEncoder(hf_dir, max_seq_len=max_seq_len, use_audio_in_video=use_audio_in_video,
                                   **(media_overrides or {}))
        self.pack_budget = int(pack_budget or max_seq_len)
        self.pad_to_multiple = int(pad_to_multiple)
        self.packed = False  # set by build_* helpers when packing is on
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)  # since construction (per worker process)
        self._skipped_since_batch = dict.fromkeys(SKIP_REASONS, 0)  # carried on the next batch (OmniBatch.skipped)
        self._failures_in_a_row = 0

    @stateless
    def encode_sample(self, sample: OmniSample) -> EncodedSample:
        sid = sample.record.get("id")
        try:
            encoded = self.encoder.encode_canonical(sample.record, sample.media, key=sample.__key__)
        except OverLongSample as exc:
            self._skip(sample, "over_long", f"skipping over-long sample {sid}: {exc}")
        except MediaError as exc:
            self._skip(sample, "decode", f"skipping sample {sid}: media the encoder cannot use: {exc}")
        except (ShardFormatError, *SYSTEM_EXCEPTIONS):  # shards of another pipeline version, a bug: stop training
            raise
        except Exception as exc:  # noqa: BLE001  any other failure of one sample: counted, one line, no traceback
            self._skip(sample, "encode", f"skipping sample {sid}: encoding failed: {' '.join(error_text(exc).split())}")
        self._failures_in_a_row = 0
        encoded.__restore_key__ = sample.__restore_key__
        encoded.__subflavors__ = sample.__subflavors__
        encoded.__sources__ = sample.__sources__
        return encoded

    def _skip(self, sample: OmniSample, reason: str, line: str) -> None:
        """Count and log one skipped sample (one line, no traceback) and raise Energon's SkipSample; after
        ``max_failures_in_a_row`` undecodable/unencodable samples in a row, stop (Energon counts no SkipSample, so a
        data set where every sample fails would otherwise be skipped round after round)."""
        self.skipped[reason] += 1
        self._skipped_since_batch[reason] += 1
        log.warning(line)
        if reason != "over_long":
            self._failures_in_a_row += 1
            if self._failures_in_a_row >= self.max_failures_in_a_row:
                raise FatalSampleError.from_sample(
                    sample, f"{self._failures_in_a_row} samples in a row could not be encoded, the last: {line}")
        raise SkipSample()

    def select_samples_to_pack(self, samples: list[EncodedSample]) -> list[list[EncodedSample]]:
        groups = select_packs([s.length for s in samples], self.pack_budget)
        return [[samples[i] for i in group] for group in groups]

    @stateless
    def pack_selected_samples(self, samples: list[EncodedSample]) -> EncodedSample:
        return pack(samples)

    def batch(self, samples: list[EncodedSample]) -> OmniBatch:
        batch = collate(samples, pad_id=self.encoder.pad_id, packed=self.packed,
                        use_audio_in_video=self.encoder.use_audio_in_video, pad_to_multiple=self.pad_to_multiple)
        batch.skipped, self._skipped_since_batch = self._skipped_since_batch, dict.fromkeys(SKIP_REASONS, 0)
        return batch


def build_dataset(shards_dir: Path, task_encoder: OmniTaskEncoder, *, split: str = "train", batch_size: int = 1,
                  packing_buffer_size: Optional[int] = None, worker_config: Optional[WorkerConfig] = None,
                  shuffle_buffer_size: Optional[int] = 64, max_samples_per_sequence: Optional[int] = 64,
                  repeat: bool = True):
    """Energon dataset of OmniBatch. Packing is on when ``packing_buffer_size`` is set (samples buffered, then packed
    into rows of ``task_encoder.pack_budget`` tokens; ``batch_size`` rows per micro-batch)."""
    worker_config = worker_config or WorkerConfig(rank=0, world_size=1, num_workers=0)
    task_encoder.packed = packing_buffer_size is not None
    if split == "train":
        return get_train_dataset(str(shards_dir), split_part="train", worker_config=worker_config,
                                 batch_size=batch_size, packing_buffer_size=packing_buffer_size,
                                 shuffle_buffer_size=shuffle_buffer_size,
                                 max_samples_per_sequence=max_samples_per_sequence,
                                 task_encoder=task_encoder, repeat=repeat)
    return get_val_dataset(str(shards_dir), split_part=split, worker_config=worker_config, batch_size=batch_size,
                           packing_buffer_size=packing_buffer_size, task_encoder=task_encoder)


def build_loader(shards_dir: Path, task_encoder: OmniTaskEncoder, **kwargs):
    """A savable Energon loader: ``loader.save_state_rank()`` gives a state; pass it as ``restore_state`` to
    :func:`restore_loader` (same arguments) to continue the data stream exactly where it was."""
    return get_savable_loader(build_dataset(shards_dir, task_encoder, **kwargs))


def restore_loader(shards_dir: Path, task_encoder: OmniTaskEncoder, restore_state, **kwargs):
    loader = build_loader(shards_dir, task_encoder, **kwargs)
    loader.restore_state_rank(restore_state)
    return loader
