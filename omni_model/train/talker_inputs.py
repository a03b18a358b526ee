"""A thinker micro-batch with spoken answers -> the talker's teacher-forced batch, built by the (frozen, tuned) thinker
exactly as transformers' `Qwen3OmniMoeForConditionalGeneration.generate` builds the talker's input (transformers
5.24, modeling_qwen3_omni_moe.py: `generate`, `_get_talker_user_parts`, `_get_talker_assistant_parts`, the talker's
`prepare_inputs_for_generation` and `compute_3d_position_ids`).

For a spoken assistant turn whose header `<|im_start|>assistant\\n` starts at token a, answer tokens t_0..t_{n-1}
(t_{n-1} = `<|im_end|>`, the thinker's EOS) and codec frames f_0..f_{T-1} (G codes each), the talker sequence is

    user part     every token of the prompt (tokens before a) whose turn is a user turn, in order (system turns and
                  earlier assistant turns are left out): text_projection(thinker embedding), or at an audio / image /
                  video pad hidden_projection(the thinker's hidden state `talker_config.accept_hidden_layer`)
    header (3)    text_projection(embedding of <|im_start|>, assistant, \\n), no codec
    control (6)   tts_pad x 4 + codec [nothink, think_bos, think_eos, speaker id]; tts_bos + codec_pad;
                  text t_0 + codec_bos                      (the last one predicts f_0's group 0)
    frames (T)    frame f_k (all G codes embedded, summed) + text t_{k+1} for k < n-2, tts_eos at k = n-2, tts_pad
                  after                                     (position of f_k predicts f_{k+1}'s group 0, the last EOS)

where "text x" is text_projection(the thinker's input embedding of token x) (tts_* tokens are thinker vocabulary
entries). The code predictor learns groups 1..G-1 of f_k from the talker's final hidden state at the position that
predicted f_k's group 0. Positions: 0.. on all three MRoPE axes without media, else the thinker's rope index over the
talker's ids (user ids, then tts_pad for the rest) with the media of the user part, as the talker's `get_rope_index`
computes them (generate passes the talker no use_audio_in_video: data.use_audio_in_video is refused here).

The thinker's hidden state `k = accept_hidden_layer` is transformers' `hidden_states[k]`: the input embeddings for
k = 0, the output of decoder layer k-1 BEFORE its deepstack addition for 0 < k < L (transformers records a layer's
output by a hook on the layer; the deepstack features are added after it in the model's loop), and the final-norm
output for k = L. `thinker_states` runs only the first k layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..configs import config_dict, talker_config_of, thinker_config_of
from .talker_step import IGNORE, TalkerBatch

HEADER = 3  # <|im_start|> assistant \n
CONTROL = 6  # 4 x tts_pad, tts_bos, first text token


class TalkerDataError(ValueError):
    """A spoken turn the talker batch cannot be built from (the message names the sample and the reason)."""


@dataclass(frozen=True)
class TalkerIds:
    """The token and codec ids generate reads (config.json top level, thinker_config, talker_config)."""
    im_start: int
    im_end: int
    user: int
    assistant: int
    tts_pad: int
    tts_bos: int
    tts_eos: int
    media: tuple  # audio, image, video pad ids (positions that take the hidden projection)
    codec_prefix: tuple  # nothink, think_bos, think_eos, speaker, pad, bos
    codec_eos: int
    accept_layer: int
    num_code_groups: int

    @classmethod
    def of(cls, hf_config, speaker: str) -> "TalkerIds":
        cfg = config_dict(hf_config)
        talker, thinker = talker_config_of(cfg), thinker_config_of(cfg)
        speakers = {name.lower(): int(i) for name, i in talker["speaker_id"].items()}
        if speaker.lower() not in speakers:
            raise TalkerDataError(f"train_talker.speaker = {speaker!r}: the checkpoint's talker knows "
                                  f"{sorted(speakers)}")
        return cls(
            im_start=cfg["im_start_token_id"], im_end=cfg["im_end_token_id"], user=cfg["user_token_id"],
            assistant=cfg["assistant_token_id"], tts_pad=cfg["tts_pad_token_id"], tts_bos=cfg["tts_bos_token_id"],
            tts_eos=cfg["tts_eos_token_id"],
            media=(thinker["audio_token_id"], thinker["image_token_id"], thinker["video_token_id"]),
            codec_prefix=(talker["codec_nothink_id"], talker["codec_think_bos_id"], talker["codec_think_eos_id"],
                          speakers[speaker.lower()], talker["codec_pad_id"], talker["codec_bos_id"]),
            codec_eos=talker["codec_eos_token_id"], accept_layer=int(talker["accept_hidden_layer"]),
            num_code_groups=int(talker["num_code_groups"]))


# ---------------------------------------------------------------------------------------------- the thinker's side
def thinker_states(thinker, batch, layer: int) -> tuple:
    """(input token embeddings [B, S, H], transformers' hidden_states[layer] [B, S, H]) of an unpacked OmniBatch,
    no grad. `thinker`: our mcore Qwen3OmniThinker (one pipeline stage); runs its first `layer` decoder layers."""
    from megatron.core import tensor_parallel

    from .forward_step import to_device

    if batch.cu_seqlens is not None:
        raise TalkerDataError("talker batches are built from unpacked thinker rows (train_talker runs without packing)")
    lm = thinker.language_model
    device = next(thinker.parameters()).device
    media = {name: getattr(batch, name) for name in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                                     "video_grid_thw", "input_features", "feature_attention_mask",
                                                     "audio_feature_lengths")}
    inputs = to_device(dict(media, input_ids=batch.input_ids, position_ids=batch.position_ids,
                            padding_mask=batch.attention_mask == 0), device)
    with torch.no_grad():
        word = lm.embed(inputs["input_ids"])  # [S, B, H]
        decoder_input, visual_mask, deepstack = thinker.embed_multimodal(
            inputs["input_ids"], *(inputs[name] for name in media))
        hidden = _first_layers(lm, decoder_input, inputs["position_ids"], inputs["padding_mask"], visual_mask,
                               deepstack, layer)
        if lm.config.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    return word.transpose(0, 1), hidden.transpose(0, 1)


def _first_layers(lm, decoder_input, position_ids, padding_mask, visual_mask, deepstack, layer: int):
    """transformers' hidden_states[layer] (module doc) through the first `layer` layers of our decoder, [S(/tp), B, H]."""
    from megatron.core import tensor_parallel

    num_layers = len(lm.decoder.layers)
    if lm.decoder.layers[0].layer_number != 1 or layer > num_layers:
        raise TalkerDataError(f"talker_config.accept_hidden_layer {layer}: the thinker must hold layers 1..{layer} "
                              f"in one stage (it holds {num_layers} from {lm.decoder.layers[0].layer_number})")
    s, b, h = decoder_input.shape
    # deepstack levels added after the layers before `layer` - 1 (all of them for the final state)
    levels = len(deepstack or ()) if layer == num_layers else min(len(deepstack or ()), max(layer - 1, 0))
    context = None
    if levels:
        context = lm._deepstack_context(visual_mask, deepstack[:levels], s, b, h, decoder_input.dtype,
                                        decoder_input.device)
    hidden = decoder_input
    if lm.config.sequence_parallel:
        hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
        context = tensor_parallel.scatter_to_sequence_parallel_region(context) if context is not None else None
        padding_mask = tensor_parallel.scatter_to_sequence_parallel_region(
            padding_mask.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()
    rotary = lm.rotary_pos_emb(position_ids)
    for decoder_layer in lm.decoder.layers[:layer]:
        hidden, context = decoder_layer(hidden_states=hidden, attention_mask=None, context=context,
                                        rotary_pos_emb=rotary, padding_mask=padding_mask)
    if layer == num_layers:
        hidden = lm.decoder.final_layernorm(hidden)
    return hidden


# ------------------------------------------------------------------------------------------------ the talker's side
@dataclass
class SpokenTurn:
    """One talker sequence, before batching."""
    thinker_rows: list  # per position: ("embed", row, token index) | ("token", token id) | ("hidden", row, index)
    codes: torch.Tensor  # [P, G] codec codes added at each position (-1 = none)
    labels: torch.Tensor  # [P] first-group target (shifted), IGNORE where none
    frame_positions: list  # positions whose hidden state predicts frame k
    frames: torch.Tensor  # [T, G]
    talker_ids: list  # ids for the rope index (user ids, tts_pad after)
    media: dict  # this sequence's user-part media for the rope index


def assistant_header(ids: list, ordinal: int, ids_of: TalkerIds, where: str) -> int:
    """Index of the `<|im_start|>` of the ordinal-th assistant turn (0-based) in a token list."""
    starts = [i for i in range(len(ids) - 1) if ids[i] == ids_of.im_start and ids[i + 1] == ids_of.assistant]
    if ordinal >= len(starts):
        raise TalkerDataError(f"{where}: assistant turn {ordinal} not found ({len(starts)} assistant turns)")
    return starts[ordinal]


def spoken_turn(ids: list, row: int, message: int, codes: torch.Tensor, ids_of: TalkerIds, media: dict,
                where: str) -> SpokenTurn:
    """The talker sequence of one spoken assistant turn (`message`: its index in the conversation; roles alternate
    after an optional system message, so it is assistant turn (message - 1) // 2) of the sequence `ids` (this row's
    real tokens)."""
    a = assistant_header(ids, (message - 1) // 2, ids_of, where)
    try:
        end = ids.index(ids_of.im_end, a + HEADER)
    except ValueError:
        raise TalkerDataError(f"{where}: the spoken answer has no <|im_end|> (cut by max_seq_len?)") from None
    answer = list(range(a + HEADER, end + 1))  # token indices of t_0..t_{n-1}
    user = _user_positions(ids, a, ids_of)
    groups, frames = codes.shape
    if groups != ids_of.num_code_groups or frames < 1:
        raise TalkerDataError(f"{where}: speech codes {list(codes.shape)}, expected [{ids_of.num_code_groups}, >= 1]")
    rows = [("hidden", row, i) if ids[i] in ids_of.media else ("embed", row, i) for i in user]
    rows += [("embed", row, i) for i in range(a, a + HEADER)]
    rows += [("token", ids_of.tts_pad)] * 4 + [("token", ids_of.tts_bos), ("embed", row, answer[0])]
    trailing = [("embed", row, i) for i in answer[1:-1]] + [("token", ids_of.tts_eos)]
    rows += [trailing[k] if k < len(trailing) else ("token", ids_of.tts_pad) for k in range(frames)]
    prompt = len(user) + HEADER + CONTROL
    length = prompt + frames
    code_in = torch.full((length, groups), -1, dtype=torch.long)
    code_in[len(user) + HEADER:prompt, 0] = torch.tensor(ids_of.codec_prefix)
    frame_codes = codes.t().to(torch.long)  # [T, G]
    code_in[prompt:] = frame_codes
    labels = torch.full((length,), IGNORE, dtype=torch.long)
    labels[prompt - 1:length - 1] = frame_codes[:, 0]
    labels[length - 1] = ids_of.codec_eos
    talker_ids = [ids[i] for i in user] + [ids_of.tts_pad] * (HEADER + CONTROL + frames)
    return SpokenTurn(rows, code_in, labels, list(range(prompt - 1, length - 1)), frame_codes, talker_ids, media)


def _user_positions(ids: list, before: int, ids_of: TalkerIds) -> list:
    """Token indices (< before) whose turn is a user turn: the token after the last `<|im_start|>` at or before
    them is `user` (generate's role rule, so the `<|im_start|>user` header and its `<|im_end|>\\n` are in)."""
    out, role = [], None
    for i in range(before):
        if ids[i] == ids_of.im_start:
            role = ids[i + 1] if i + 1 < len(ids) else None
        if role == ids_of.user:
            out.append(i)
    return out


class TalkerBatches:
    """OmniBatch (unpacked rows) + the frozen thinker -> TalkerBatch: one right-padded row per spoken answer (padding
    rows are labelled IGNORE and masked from MoE routing), or None when the micro-batch has no spoken answer."""

    def __init__(self, hf_config, speaker: str = "ethan", pad_to_multiple: int = 1):
        cfg = config_dict(hf_config)
        self.ids = TalkerIds.of(cfg, speaker)
        self.config = cfg
        self.pad_to_multiple = int(pad_to_multiple)

    def __call__(self, thinker, batch) -> Optional[TalkerBatch]:
        if not batch.talker_codes:
            return None
        if batch.use_audio_in_video:
            raise TalkerDataError("data.use_audio_in_video: transformers' generate gives the talker no audio-in-video "
                                  "positions; train the talker on data encoded without it")
        media = _media_per_row(batch, self.ids)
        turns = []
        for codes, (row, sequence, message) in zip(batch.talker_codes, batch.talker_turns):
            real = int(batch.attention_mask[row].sum())
            ids = batch.input_ids[row, :real].tolist()
            where = f"sample {batch.sample_ids[row][sequence] if batch.sample_ids else row}, message {message}"
            turns.append(spoken_turn(ids, row, message, codes, self.ids, media[row], where))
        word, hidden = thinker_states(thinker, batch, self.ids.accept_layer)
        return self._collate(turns, word, hidden, thinker)

    def _collate(self, turns: list, word, hidden, thinker) -> TalkerBatch:
        n, groups = len(turns), self.ids.num_code_groups
        length = max(len(t.labels) for t in turns)
        length = -(-length // self.pad_to_multiple) * self.pad_to_multiple
        ht = word.shape[-1]
        device = word.device
        specials = {}
        with torch.no_grad():
            for token in (self.ids.tts_pad, self.ids.tts_bos, self.ids.tts_eos):
                specials[token] = thinker.language_model.embed(torch.tensor([[token]], device=device))[0, 0]
        embeds = torch.zeros(n, length, ht, dtype=word.dtype, device=device)
        mm = torch.zeros(n, length, dtype=torch.bool)
        mm_rows = []
        codes = torch.full((n, length, groups), -1, dtype=torch.long)
        labels = torch.full((n, length), IGNORE, dtype=torch.long)
        positions = torch.zeros(3, n, length, dtype=torch.float32)
        frame_positions, frame_codes = [], []
        for b, turn in enumerate(turns):
            for p, source in enumerate(turn.thinker_rows):
                if source[0] == "token":
                    embeds[b, p] = specials[source[1]]
                elif source[0] == "embed":
                    embeds[b, p] = word[source[1], source[2]]
                else:
                    mm[b, p] = True
                    mm_rows.append(hidden[source[1], source[2]])
            size = len(turn.labels)
            codes[b, :size], labels[b, :size] = turn.codes, turn.labels
            positions[:, b, :size] = torch.from_numpy(self._positions(turn))
            frame_positions += [b * length + p for p in turn.frame_positions]
            frame_codes.append(turn.frames)
        thinker_hidden = torch.stack(mm_rows) if mm_rows else hidden.new_zeros(0, ht)
        return TalkerBatch(thinker_embeds=embeds, multimodal_mask=mm.to(device), thinker_hidden=thinker_hidden,
                           codec_codes=codes, position_ids=positions, labels=labels,
                           frame_positions=torch.tensor(frame_positions), frame_codes=torch.cat(frame_codes))

    def _positions(self, turn: SpokenTurn):
        """MRoPE positions [3, P] of one talker sequence (module doc)."""
        import numpy as np

        if not any(turn.media.values()):
            return np.arange(len(turn.talker_ids), dtype=np.float32)[None].repeat(3, 0)
        from ..data.rope_index import rope_index

        talker = talker_config_of(self.config)
        audio = thinker_config_of(self.config)["audio_config"]
        token_ids = {"vision_start": talker["vision_start_token_id"], "audio_start": talker["audio_start_token_id"],
                     "image_pad": talker["image_token_id"], "video_pad": talker["video_token_id"],
                     "audio_pad": talker["audio_token_id"]}
        return rope_index(np.asarray(turn.talker_ids), token_ids=token_ids,
                          merge_size=int(talker["spatial_merge_size"]),
                          position_id_per_seconds=float(talker["position_id_per_seconds"]),
                          n_window=int(audio["n_window"]), **turn.media)


def _media_per_row(batch, ids_of: TalkerIds) -> list:
    """Per row, the rope-index media arguments of the media in that row (the batch lists them row by row in order
    of appearance; a medium is one run of its pad token)."""
    rows = [batch.input_ids[row][batch.attention_mask[row].bool()] for row in range(batch.input_ids.shape[0])]
    return _split_media(batch, rows, ids_of)


def _split_media(batch, rows: list, ids_of: TalkerIds) -> list:
    audio_id, image_id, video_id = ids_of.media
    out, used = [], {"image": 0, "video": 0, "audio": 0}
    for ids in rows:
        # a media block is a run of its pad token; count runs
        n = {}
        for kind, token in (("audio", audio_id), ("image", image_id), ("video", video_id)):
            hit = ids == token
            n[kind] = int((hit[1:] & ~hit[:-1]).sum() + hit[:1].sum()) if hit.numel() else 0
        media = {
            "image_grid_thw": _take(batch.image_grid_thw, used["image"], n["image"]),
            "video_grid_thw": _take(batch.video_grid_thw, used["video"], n["video"]),
            "video_second_per_grid": _take(batch.video_second_per_grid, used["video"], n["video"]),
            "audio_feature_lengths": _take(_audio_lengths(batch), used["audio"], n["audio"]),
        }
        for kind in used:
            used[kind] += n[kind]
        out.append(media)
    return out


def _take(values, start: int, count: int) -> list:
    return [] if values is None or count == 0 else values[start:start + count].tolist()


def _audio_lengths(batch):
    if batch.audio_feature_lengths is not None:
        return batch.audio_feature_lengths.reshape(-1)
    if batch.feature_attention_mask is not None:
        return batch.feature_attention_mask.sum(-1)
    return None
