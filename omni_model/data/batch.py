"""The batch contract between the data pipeline and the model.

:class:`EncodedSample` is one tokenised conversation (or one packed row of several), :class:`OmniBatch` a
micro-batch. Field names follow transformers' Qwen3-Omni thinker ``forward`` where one exists.

Two adapters, one per model family (the same names mean different things on the two sides):
``OmniBatch.hf_inputs()`` gives transformers' keywords (HF attention mask, unshifted labels);
``omni_model.train.forward_step.thinker_inputs(batch)`` gives the Megatron-Core thinker's (THD packing, shifted labels,
loss mask, padding mask).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from megatron.energon import Sample, edataclass

from .template import IGNORE_INDEX


@edataclass
class EncodedSample(Sample):
    """One sequence, or one packed row (then ``seq_lens`` has several entries). All arrays unpadded.

    Media arrays hold this row's media in order of appearance.
    """

    sample_ids: list  # ids of the conversations in this row
    input_ids: np.ndarray  # int64 [L]
    labels: np.ndarray  # int64 [L], unshifted, -100 where not trained
    position_ids: np.ndarray  # float32 [3, L], restarting at 0 for every sequence
    seq_lens: list  # lengths of the sequences in this row (sum = L)
    pixel_values: Optional[np.ndarray] = None  # float32 [n_patches, C*tp*p*p]
    image_grid_thw: Optional[np.ndarray] = None  # int64 [n_images, 3]
    pixel_values_videos: Optional[np.ndarray] = None
    video_grid_thw: Optional[np.ndarray] = None  # int64 [n_videos, 3]
    video_second_per_grid: Optional[np.ndarray] = None  # float32 [n_videos]
    input_features: list = field(default_factory=list)  # per audio: float32 [128, frames_i] (mask applied)
    audio_feature_lengths: Optional[np.ndarray] = None  # int64 [n_audios] valid mel frames
    talker_codes: list = field(default_factory=list)  # per spoken answer: int64 [num_code_groups, frames_i]
    talker_turns: list = field(default_factory=list)  # per spoken answer: (sequence index in the row, message index)

    @property
    def length(self) -> int:
        return int(len(self.input_ids))


@dataclass
class OmniBatch:
    """A micro-batch for the Qwen3-Omni thinker.

    Shapes: ``B`` rows of ``S`` tokens (right-padded). Packed mode (``cu_seqlens`` set): each row holds several
    sequences back to back; ``cu_seqlens`` are the boundaries over the flattened ``B*S`` tokens (int32, starting at 0,
    ending at ``B*S``; right padding of a row is its own segment with ``loss_mask`` 0), usable as THD
    ``cu_seqlens_q/kv``; ``position_ids`` restart at 0 at each boundary. With ``B == 1`` this is the ``[1, T]`` layout.

    Labels, two conventions, both provided:

    * ``labels`` [B,S] int64 — **unshifted**, transformers' convention: ``labels[t]`` is the target of
      ``input_ids[t]`` itself (the loss function shifts). -100 on non-trained tokens (system/user turns, assistant
      header, media pads, padding). Trained = assistant content + its ``<|im_end|>``.
    * ``shift_labels`` [B,S] int64 — **already shifted**, Megatron's convention: ``shift_labels[t] = labels[t+1]``
      within the same sequence, -100 at the last token of every sequence (never predicts across a packing boundary)
      and on padding. ``loss_mask`` [B,S] float32 = ``shift_labels != -100``. Use with logits at position ``t``.

    Other fields:

    * ``input_ids`` [B,S] int64; pad id = ``<|endoftext|>`` (never trained, masked out).
    * ``attention_mask`` [B,S] int64 — 1 real token, 0 padding.
    * ``position_ids`` [3,B,S] float32 — MRoPE (t, h, w) from the thinker's rope-index rules (float like
      transformers: video t = grid * second_per_grid * position_id_per_seconds); 0 on padding.
    * ``pixel_values`` [N_img_patches, 1536] float32 + ``image_grid_thw`` [n_images, 3] int64, or None.
    * ``pixel_values_videos`` [N_vid_patches, 1536] + ``video_grid_thw`` [n_videos, 3] + ``video_second_per_grid``
      [n_videos] float32, or None.
    * ``input_features`` [n_audios, 128, F] float32 (each clip's valid frames first, zero padded to the longest F),
      ``feature_attention_mask`` [n_audios, F] int64, ``audio_feature_lengths`` [n_audios] int64; or None.
    * Media of the whole micro-batch are in order of appearance, row by row (what the thinker's scatter expects).
    * ``use_audio_in_video``: whether video blocks interleave their audio track (then audios include video audio).
    * ``sample_ids``: per row, the conversation ids; ``num_tokens``: real tokens; ``num_trained``: loss tokens.
    * ``pad_id``: the token id of the padding (set by ``collate``).
    * ``skipped``: ``{"over_long": n, "decode": n}`` samples the task encoder skipped (in this loader worker) since
      its previous batch; training sums them over batches, workers and ranks.
    * ``talker_codes``: the spoken answers' codec codes (for the talker stage; the thinker ignores them), one int64
      tensor [num_code_groups, frames] per spoken answer, row by row in order; None when no sample speaks.
      ``talker_turns``: per entry (row, sequence index in the row, message index of the spoken assistant turn in
      that conversation).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    shift_labels: torch.Tensor
    loss_mask: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: Optional[int] = None
    pixel_values: Optional[torch.Tensor] = None
    image_grid_thw: Optional[torch.Tensor] = None
    pixel_values_videos: Optional[torch.Tensor] = None
    video_grid_thw: Optional[torch.Tensor] = None
    video_second_per_grid: Optional[torch.Tensor] = None
    input_features: Optional[torch.Tensor] = None
    feature_attention_mask: Optional[torch.Tensor] = None
    audio_feature_lengths: Optional[torch.Tensor] = None
    use_audio_in_video: bool = False
    sample_ids: list = field(default_factory=list)
    num_tokens: int = 0
    num_trained: int = 0
    skipped: dict = field(default_factory=dict)  # samples the task encoder skipped since this worker's last batch
    pad_id: Optional[int] = None  # the id padding tokens carry (context parallelism pads each sequence with it)
    talker_codes: Optional[list] = None  # per spoken answer: int64 [num_code_groups, frames] (None: no speech)
    talker_turns: Optional[list] = None  # per spoken answer: (row, sequence in the row, message index)

    def tensors(self) -> dict:
        """{field name: tensor} of the fields that hold a tensor now (media fields are None in a batch without them)."""
        return {name: value for name, value in vars(self).items() if isinstance(value, torch.Tensor)}

    def to(self, device) -> "OmniBatch":
        for name, value in self.tensors().items():
            setattr(self, name, value.to(device, non_blocking=True))
        return self

    def pin_memory(self) -> "OmniBatch":
        """Page-locked copies of the tensors. torch's DataLoader (energon's, pin_memory=True) calls this in its pin
        thread; without it a dataclass passes through unpinned, and `to(device, non_blocking=True)` of pageable memory
        is a synchronous copy: the H200 profile of a multimodal step showed 22 of them, 17.9 ms, with the host
        blocked."""
        for name, value in self.tensors().items():
            setattr(self, name, value.pin_memory())
        return self

    def hf_inputs(self) -> dict:
        """Keyword arguments for transformers' ``Qwen3OmniMoeThinkerForConditionalGeneration.forward`` (HF-style
        attention mask, unshifted labels). The Megatron-Core thinker takes ``forward_step.thinker_inputs(batch)``."""
        keys = ("input_ids", "attention_mask", "position_ids", "labels", "pixel_values", "image_grid_thw",
                "pixel_values_videos", "video_grid_thw", "video_second_per_grid", "input_features",
                "feature_attention_mask")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        if self.use_audio_in_video:
            out["use_audio_in_video"] = True
        return out


def shifted(labels: np.ndarray, seq_lens: list) -> np.ndarray:
    """labels[t+1] within each sequence, -100 at every sequence's last token."""
    out = np.full_like(labels, IGNORE_INDEX)
    start = 0
    for length in seq_lens:
        if length > 1:
            out[start:start + length - 1] = labels[start + 1:start + length]
        start += length
    return out


def collate(samples: list[EncodedSample], pad_id: int, packed: bool, use_audio_in_video: bool = False,
            pad_to_multiple: int = 1) -> OmniBatch:
    """Right-pad rows to a common length and stack media in order."""
    batch_size = len(samples)
    longest = max(s.length for s in samples)
    width = -(-longest // pad_to_multiple) * pad_to_multiple
    input_ids = np.full((batch_size, width), pad_id, dtype=np.int64)
    labels = np.full((batch_size, width), IGNORE_INDEX, dtype=np.int64)
    shift = np.full((batch_size, width), IGNORE_INDEX, dtype=np.int64)
    attention = np.zeros((batch_size, width), dtype=np.int64)
    positions = np.zeros((3, batch_size, width), dtype=np.float32)
    boundaries = [0]
    for row, sample in enumerate(samples):
        n = sample.length
        input_ids[row, :n] = sample.input_ids
        labels[row, :n] = sample.labels
        shift[row, :n] = shifted(sample.labels, sample.seq_lens)
        attention[row, :n] = 1
        positions[:, row, :n] = sample.position_ids
        base = row * width
        for length in sample.seq_lens:
            boundaries.append(boundaries[-1] + length)
        if n < width:
            boundaries.append(base + width)
    pixel = [s.pixel_values for s in samples if s.pixel_values is not None and len(s.pixel_values)]
    image_grid = [s.image_grid_thw for s in samples if s.image_grid_thw is not None and len(s.image_grid_thw)]
    vpixel = [s.pixel_values_videos for s in samples if s.pixel_values_videos is not None and len(s.pixel_values_videos)]
    vgrid = [s.video_grid_thw for s in samples if s.video_grid_thw is not None and len(s.video_grid_thw)]
    vsec = [s.video_second_per_grid for s in samples if s.video_grid_thw is not None and len(s.video_grid_thw)]
    feats = [f for s in samples for f in s.input_features]
    out = OmniBatch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        shift_labels=torch.from_numpy(shift),
        loss_mask=torch.from_numpy((shift != IGNORE_INDEX).astype(np.float32)),
        attention_mask=torch.from_numpy(attention),
        position_ids=torch.from_numpy(positions),
        use_audio_in_video=use_audio_in_video,
        sample_ids=[list(s.sample_ids) for s in samples],
        num_tokens=int(attention.sum()),
        num_trained=int((shift != IGNORE_INDEX).sum()),
        pad_id=int(pad_id),
    )
    if packed:
        out.cu_seqlens = torch.tensor(boundaries, dtype=torch.int32)
        out.max_seqlen = int(np.diff(boundaries).max())
    if pixel:
        out.pixel_values = torch.from_numpy(np.concatenate(pixel))
        out.image_grid_thw = torch.from_numpy(np.concatenate(image_grid).astype(np.int64))
    if vpixel:
        out.pixel_values_videos = torch.from_numpy(np.concatenate(vpixel))
        out.video_grid_thw = torch.from_numpy(np.concatenate(vgrid).astype(np.int64))
        out.video_second_per_grid = torch.from_numpy(np.concatenate(vsec).astype(np.float32))
    spoken = [(row, codes, turn) for row, s in enumerate(samples) for codes, turn in zip(s.talker_codes, s.talker_turns)]
    if spoken:
        out.talker_codes = [torch.from_numpy(codes) for _, codes, _ in spoken]
        out.talker_turns = [(row, *turn) for row, _, turn in spoken]
    if feats:
        frames = max(f.shape[1] for f in feats)
        stacked = np.zeros((len(feats), feats[0].shape[0], frames), dtype=np.float32)
        mask = np.zeros((len(feats), frames), dtype=np.int64)
        for index, feature in enumerate(feats):
            stacked[index, :, :feature.shape[1]] = feature
            mask[index, :feature.shape[1]] = 1
        out.input_features = torch.from_numpy(stacked)
        out.feature_attention_mask = torch.from_numpy(mask)
        out.audio_feature_lengths = torch.from_numpy(mask.sum(1))
    return out
