"""MRoPE position ids (t, h, w) of one Qwen3-Omni sequence, following the thinker's ``get_rope_index`` rules.

* Text and special tokens: all three axes equal, +1 per token.
* Image (``<|vision_start|><|image_pad|>*N<|vision_end|>``): t = 0 (one temporal patch; t scales by
  ``position_id_per_seconds``), h/w = merged-patch row/column, all offset by the running start.
* Video: t = grid index * ``second_per_grid`` * ``position_id_per_seconds`` (13 in the release; float, as in
  transformers), h/w as for images.
* Audio (``<|audio_start|><|audio_pad|>*N<|audio_end|>``): consecutive like text.
* Audio in video (``<|vision_start|><|audio_start|>...<|audio_end|><|vision_end|>``): video and audio positions are
  merged by their t value (video first on ties), two-token bos/eos.
* After each media block the next position is ``max(previous block) + 1``.

Positions restart at 0 for every sequence, so a packed row is the concatenation of per-sequence results.
Parity with ``transformers``' implementation is tested (tests/test_data_parity.py).
"""

from __future__ import annotations

import numpy as np

from .media import audio_output_lengths


def _vision_block(start: float, grid_thw, merge: int, t_values: np.ndarray) -> np.ndarray:
    gt, gh, gw = (int(v) for v in grid_thw)
    lh, lw = gh // merge, gw // merge
    t = np.repeat(t_values.astype(np.float64), lh * lw)
    h = np.tile(np.repeat(np.arange(lh), lw), gt).astype(np.float64)
    w = np.tile(np.tile(np.arange(lw), lh), gt).astype(np.float64)
    return np.stack([t, h, w]) + start


def rope_index(
    input_ids: np.ndarray,
    *,
    token_ids: dict,
    image_grid_thw=(),
    video_grid_thw=(),
    audio_feature_lengths=(),
    video_second_per_grid=(),
    merge_size: int = 2,
    position_id_per_seconds: float = 13,
    n_window: int = 50,
    use_audio_in_video: bool = False,
) -> np.ndarray:
    """Position ids [3, L] (float32) for one unpadded sequence. Media arguments list this sequence's media in order.

    ``token_ids`` needs ``vision_start``, ``image_pad``, ``video_pad``, ``audio_start``, ``audio_pad``.
    ``audio_feature_lengths`` are mel-frame counts (as transformers' ``audio_seqlens``).
    """
    ids = np.asarray(input_ids).tolist()
    n = len(ids)
    vs, img, vid = token_ids["vision_start"], token_ids["image_pad"], token_ids["video_pad"]
    aus = token_ids["audio_start"]
    blocks: list[np.ndarray] = []
    st = 0  # index into ids
    image_idx = video_idx = audio_idx = 0
    next_pos = 0.0

    def push(block: np.ndarray) -> None:
        nonlocal next_pos
        blocks.append(block)
        next_pos = float(block.max()) + 1

    def find(token: int, start: int) -> int:
        try:
            return ids.index(token, start)
        except ValueError:
            return n + 1

    while True:
        ed_vision = find(vs, st)
        ed_audio = find(aus, st)
        if ed_vision > n and ed_audio > n:
            break
        min_ed = min(ed_vision, ed_audio)
        text_len = min_ed - st
        if text_len:
            push(np.arange(text_len, dtype=np.float64)[None].repeat(3, 0) + next_pos)
        in_video = min_ed == ed_vision and ed_audio == ed_vision + 1
        bos_eos = 2 if in_video else 1
        push(np.arange(bos_eos, dtype=np.float64)[None].repeat(3, 0) + next_pos)
        start = next_pos
        if min_ed == ed_audio:
            length = audio_output_lengths(int(audio_feature_lengths[audio_idx]), n_window)
            push(np.arange(length, dtype=np.float64)[None].repeat(3, 0) + start)
            st = min_ed + 1 + length + 1
            audio_idx += 1
        elif in_video:
            length = audio_output_lengths(int(audio_feature_lengths[audio_idx]), n_window)
            audio_pos = np.arange(length, dtype=np.float64)[None].repeat(3, 0) + start
            grid = video_grid_thw[video_idx]
            t_values = np.arange(int(grid[0])) * float(video_second_per_grid[video_idx]) * position_id_per_seconds
            video_pos = _vision_block(start, grid, merge_size, t_values)
            push(_merge_by_time(video_pos, audio_pos))
            n_video = int(np.prod(grid)) // merge_size**2
            st = min_ed + 2 + length + n_video + 2
            audio_idx += 1
            video_idx += 1
        else:
            kind = ids[min_ed + 1]
            if kind == img:
                grid = image_grid_thw[image_idx]
                t_values = np.arange(int(grid[0])) * 1.0 * position_id_per_seconds
                image_idx += 1
            elif kind == vid:
                grid = video_grid_thw[video_idx]
                t_values = np.arange(int(grid[0])) * float(video_second_per_grid[video_idx]) * position_id_per_seconds
                video_idx += 1
            else:
                raise ValueError(f"<|vision_start|> at {min_ed} is followed by token {kind}, not a media pad")
            push(_vision_block(start, grid, merge_size, t_values))
            st = min_ed + 1 + int(np.prod(grid)) // merge_size**2 + 1
        push(np.arange(bos_eos, dtype=np.float64)[None].repeat(3, 0) + next_pos)
    if st < n:
        push(np.arange(n - st, dtype=np.float64)[None].repeat(3, 0) + next_pos)
    out = np.concatenate(blocks, axis=1) if blocks else np.zeros((3, 0))
    if out.shape[1] != n:
        raise ValueError(f"position ids cover {out.shape[1]} tokens, sequence has {n}: pads and media disagree")
    return out.astype(np.float32)


def _merge_by_time(video_pos: np.ndarray, audio_pos: np.ndarray) -> np.ndarray:
    """Interleave columns: take the video column while its t <= the audio column's t (transformers' rule)."""
    cols = []
    vi = ai = 0
    nv, na = video_pos.shape[1], audio_pos.shape[1]
    while vi < nv and ai < na:
        if video_pos[0, vi] <= audio_pos[0, ai]:
            cols.append(video_pos[:, vi:vi + 1])
            vi += 1
        else:
            cols.append(audio_pos[:, ai:ai + 1])
            ai += 1
    if vi < nv:
        cols.append(video_pos[:, vi:])
    if ai < na:
        cols.append(audio_pos[:, ai:])
    return np.concatenate(cols, axis=1)


def interleave_audio_video_tokens(n_video_tokens_per_grid: int, grid_t: int, second_per_grid: float,
                                  n_audio: int, position_id_per_seconds: float) -> list[str]:
    """Order of 'V'/'A' pads inside an audio-in-video block, as Qwen3OmniMoeProcessor writes it."""
    video_t = np.repeat(np.arange(grid_t) * second_per_grid * position_id_per_seconds, n_video_tokens_per_grid)
    audio_t = np.arange(n_audio)
    out, vi, ai = [], 0, 0
    while vi < len(video_t) and ai < len(audio_t):
        if video_t[vi] <= audio_t[ai]:
            out.append("V")
            vi += 1
        else:
            out.append("A")
            ai += 1
    out.extend("V" * (len(video_t) - vi))
    out.extend("A" * (len(audio_t) - ai))
    return out
