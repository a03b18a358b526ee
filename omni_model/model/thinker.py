"""The Qwen3-Omni thinker on Megatron-Core: audio tower + vision tower + MoE LLM, merged like transformers does.

    input_ids --embed--> [S, B, H]
      audio placeholders  <- AudioEncoder(input_features)                    (one row per audio token)
      image placeholders  <- VisionEncoder(pixel_values, image_grid_thw)     (+ deepstack features per level)
      video placeholders  <- VisionEncoder(pixel_values_videos, video_grid_thw)
      (images and videos together: ONE VisionEncoder forward over both, split at the images' merged-token count;
       PerfOptions.joint_visual_forward, False: the two forwards above, as transformers does)
      (or all three from `tower_outputs`: what `Qwen3OmniThinker.tower_outputs` computed for several micro-batches at
       once, e.g. the frozen towers of a training step's micro-batches in one forward each:
       PerfOptions.step_tower_forward)
    --> LLM(decoder_input, MRoPE position_ids [3, B, S], visual_pos_masks, deepstack features) --> logits / loss

Placeholders are filled in row-major (batch, sequence) order, media in order of appearance: the order of the
data pipeline's OmniBatch and of transformers' `masked_scatter`. The number of placeholder tokens of each kind
must equal the number of encoder outputs; otherwise the forward fails naming both counts (a silent truncation would
train on misaligned features).

State-dict names are the mapping's names (`language_model.*`, `vision_model.*`, `audio_model.*`), so
`omni_model.convert.load_checkpoint(thinker, ckpt_dir)` fills it from a converted checkpoint (any layout) and
`omni_model.convert.mapping.load_hf_into_model(thinker, hf_dir, prefix="")` from HF safetensors. With pipeline parallelism the
encoders live on the first stage only (deepstack needs them there too).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule

from .audio import AudioEncoder, audio_replicated, audio_transformer_config
from .language_model import Qwen3OmniLanguageModel, on_gpu_if_any, build_language_model
from .options import DEFAULT, PerfOptions, apply_options
from .transformer_config import current_tp_size, thinker_config_of
from .vision import VisionEncoder, vision_transformer_config


class PlaceholderMismatch(ValueError):
    """The input ids do not hold one placeholder token per encoder output."""


class _MaskedScatter(torch.autograd.Function):
    """`embeds.masked_scatter(mask, features)` for a mask whose number of True entries the host knows (`count`): the
    same values and gradients, but the features' gradient is gathered at rows found by `nonzero_static`, where
    torch's backward (`masked_select`) reads the count back from the GPU (a sync per media kind and micro-batch
    when the towers are trained)."""

    @staticmethod
    def forward(ctx, embeds, mask, features, count: int):
        ctx.save_for_backward(mask)
        ctx.count = count
        return embeds.masked_scatter(mask, features)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        grad_embeds = grad.masked_fill(mask, 0) if ctx.needs_input_grad[0] else None
        grad_features = None
        if ctx.needs_input_grad[2]:
            rows = torch.nonzero_static(mask[..., 0].reshape(-1), size=ctx.count).squeeze(1)
            grad_features = grad.reshape(-1, grad.shape[-1]).index_select(0, rows)
        return grad_embeds, None, grad_features, None


def _check_count(kind: str, n_tokens: int, n_features: int) -> None:
    if n_tokens != n_features:
        raise PlaceholderMismatch(
            f"{kind}: the input has {n_tokens} <{kind} pad> tokens but the {kind} encoder produced {n_features} "
            f"embeddings; the data encoder must expand each placeholder to the encoder's output length")


def _joined(parts: list, tower: VisionEncoder) -> torch.Tensor:
    """Several items' patches (pixel values of images, videos, micro-batches) as one [N, C*T*P*P] input of the tower:
    kept in their dtype when they all share one, else in the patch embedding's (which each forward casts to anyway),
    on the tower's device. One part goes as it is (the tower casts and moves it itself)."""
    if len(parts) == 1:
        return parts[0]
    flat = [p.reshape(-1, tower.patch_embed.in_features) for p in parts]
    weight = tower.patch_embed.proj.weight
    dtype = flat[0].dtype if all(p.dtype == flat[0].dtype for p in flat) else weight.dtype
    return torch.cat([p.to(weight.device, dtype) for p in flat])


def _split_sizes(per_item: torch.Tensor, items: list[int]) -> list[int]:
    """Row counts of consecutive parts of `items` items each, from the per-item counts (a host tensor: the grids' and
    the audio lengths' arithmetic, which the towers read on the host anyway)."""
    bounds = [0, *itertools.accumulate(items)]
    counts = per_item.tolist()
    return [sum(counts[a:b]) for a, b in zip(bounds, bounds[1:])]


# the media keywords of embed_multimodal / forward, as a micro-batch's entry of `Qwen3OmniThinker.tower_outputs` names
# them (the training step's thinker_inputs uses these names too)
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "input_features",
              "feature_attention_mask", "audio_feature_lengths")
_VISUAL_KEYS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


@dataclasses.dataclass(frozen=True)
class TowerOutputs:
    """What the towers make of one micro-batch's media, as `embed_multimodal` merges them: the audio tower's
    embeddings [audio tokens, H], and the vision tower's (embeds [tokens, H], [deepstack level [tokens, H], ...]) of
    the images and of the videos; None where the micro-batch has no such media."""
    audio: Optional[torch.Tensor] = None
    image: Optional[tuple] = None
    video: Optional[tuple] = None


class Qwen3OmniThinker(MegatronModule):
    def __init__(self, hf_config, language_model: Qwen3OmniLanguageModel,
                 vision_model: Optional[VisionEncoder] = None, audio_model: Optional[AudioEncoder] = None):
        super().__init__(config=language_model.config)
        thinker = thinker_config_of(hf_config)
        self.image_token_id = thinker["image_token_id"]
        self.video_token_id = thinker["video_token_id"]
        self.audio_token_id = thinker["audio_token_id"]
        self.language_model = language_model
        self.vision_model = vision_model
        self.audio_model = audio_model
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        # what mcore's schedules and finalize_model_grads read off the model they wrap (GPTModel's interface)
        self.model_type = language_model.model_type
        self.share_embeddings_and_output_weights = language_model.share_embeddings_and_output_weights
        self.joint_visual_forward = True  # PerfOptions.joint_visual_forward (apply_options sets it)
        self.step_tower_forward = True  # PerfOptions.step_tower_forward (read by the training step)
        self.tower_lookahead = True  # PerfOptions.tower_lookahead (read by the training step)

    def use_options(self, options) -> None:
        self.joint_visual_forward = options.joint_visual_forward
        self.step_tower_forward = options.step_tower_forward
        self.tower_lookahead = options.tower_lookahead

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    # -- towers ----------------------------------------------------------------------------------------------------
    def tower_outputs(self, media: Sequence[dict]) -> list[TowerOutputs]:
        """The towers' outputs of several micro-batches' media (each a dict of `embed_multimodal`'s media keywords,
        MEDIA_KEYS; absent or None = none), one TowerOutputs per micro-batch, with one audio forward over all their
        clips and one vision forward over all their images and videos (two, images then videos, when
        joint_visual_forward is off). Every part of both towers is per item (attention per clip window and per frame,
        positions from each clip's length and each item's grid, mergers per group of merge^2 patches, rows in item
        order), so each micro-batch's rows are what its own forward gives; they are split off at counts taken on the
        host (grids, audio lengths). `embed_multimodal` calls it with one micro-batch."""
        audio = self._audio_outputs(media)
        visual = self._visual_outputs(media)
        return [TowerOutputs(audio[k], visual[k, "image"], visual[k, "video"]) for k in range(len(media))]

    def _tower(self, kind: str) -> VisionEncoder:
        if self.vision_model is None:
            raise ValueError(f"{kind} inputs given but this thinker has no vision tower (frozen out or PP stage > 0)")
        return self.vision_model

    def _visual_outputs(self, media: Sequence[dict]) -> dict:
        """{(micro-batch, "image" | "video"): (embeds, deepstack levels) or None}."""
        parts = [(k, kind) for k, entry in enumerate(media) for kind in ("image", "video")
                 if entry.get(_VISUAL_KEYS[kind][0]) is not None]
        groups = [parts] if self.joint_visual_forward else [[p for p in parts if p[1] == kind]
                                                            for kind in ("image", "video")]
        out = dict.fromkeys(((k, kind) for k in range(len(media)) for kind in ("image", "video")))
        for group in filter(None, groups):
            out.update(self._vision_forward(media, group))
        return out

    def _vision_forward(self, media: Sequence[dict], group: list) -> dict:
        """One vision forward over the items of `group` ((micro-batch, kind) parts, in order): their outputs by part."""
        tower = self._tower(group[0][1])
        pixels = [media[k][_VISUAL_KEYS[kind][0]] for k, kind in group]
        grids = [media[k][_VISUAL_KEYS[kind][1]].to("cpu", torch.long) for k, kind in group]
        grid = torch.cat(grids)
        embeds, deepstack = tower(_joined(pixels, tower), grid)
        if len(group) == 1:
            return {group[0]: (embeds, deepstack)}
        sizes = _split_sizes(grid.prod(-1) // tower.merge ** 2, [len(item) for item in grids])
        levels = [level.split(sizes) for level in deepstack]
        return {part: (rows, [level[i] for level in levels]) for i, (part, rows) in
                enumerate(zip(group, embeds.split(sizes)))}

    def _audio_outputs(self, media: Sequence[dict]) -> list:
        """Each micro-batch's audio embeddings (None without audio), all clips in one audio forward: each micro-batch's
        [n, mel, frames] features (padded per micro-batch) flattened to their valid frames as the tower does first
        (AudioEncoder.flatten_batch), joined along the frames, the clip lengths joined."""
        present = [k for k, entry in enumerate(media) if entry.get("input_features") is not None]
        out = [None] * len(media)
        if not present:
            return out
        if self.audio_model is None:
            raise ValueError("audio inputs given but this thinker has no audio tower")
        if len(present) == 1:  # as given: the tower flattens it itself
            entry = media[present[0]]
            out[present[0]] = self.audio_model(entry["input_features"], feature_lens=entry.get("audio_feature_lengths"),
                                               feature_attention_mask=entry.get("feature_attention_mask"))
            return out
        flat = [self.audio_model.flatten_batch(media[k]["input_features"], media[k].get("audio_feature_lengths"),
                                               media[k].get("feature_attention_mask")) for k in present]
        lengths = [lens for _, lens in flat]  # host tensors (flatten_batch returns them on the CPU)
        embeds = self.audio_model(torch.cat([features for features, _ in flat], dim=1), feature_lens=torch.cat(lengths))
        sizes = _split_sizes(self.audio_model.output_lengths(torch.cat(lengths)), [len(lens) for lens in lengths])
        for k, rows in zip(present, embeds.split(sizes)):
            out[k] = rows
        return out

    # -- multimodal merge ------------------------------------------------------------------------------------------
    def _placeholders(self, input_ids, host_input_ids, token_id) -> int:
        """How many placeholder tokens the input holds, counted on the host's copy of the ids when given (the
        training step passes it: a count read back from the GPU would wait for every queued kernel, e.g. the
        previous micro-batch's backward, and leave the GPU idle while the host launches the towers)."""
        ids = host_input_ids if host_input_ids is not None else input_ids
        return int((ids == token_id).sum())

    def _scatter(self, embeds_bsh: torch.Tensor, mask: torch.Tensor, features: torch.Tensor, kind: str,
                 n_tokens: int):
        _check_count(kind, n_tokens, features.shape[0])
        return _MaskedScatter.apply(embeds_bsh, mask[..., None].expand_as(embeds_bsh), features.to(embeds_bsh.dtype),
                                    n_tokens)

    def embed_multimodal(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                         video_grid_thw=None, input_features=None, feature_attention_mask=None,
                         audio_feature_lengths=None, host_input_ids=None, tower_outputs: Optional[TowerOutputs] = None):
        """Full-sequence decoder input [S, B, H] + (visual_pos_masks [B, S], deepstack features) for the LLM.
        `host_input_ids`: the same ids on the host, for the placeholder counts (see _placeholders).
        `tower_outputs`: this micro-batch's outputs of `tower_outputs` computed beforehand, in place of the media
        (then not given): the towers are not called."""
        media = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                     video_grid_thw=video_grid_thw, input_features=input_features,
                     feature_attention_mask=feature_attention_mask, audio_feature_lengths=audio_feature_lengths)
        if tower_outputs is None:
            tower_outputs = self.tower_outputs([media])[0]
        elif any(value is not None for value in media.values()):
            given = [name for name, value in media.items() if value is not None]
            raise ValueError(f"tower_outputs given with media inputs {given}: the media went through the towers "
                             f"already")
        embeds = self.language_model.embed(input_ids).transpose(0, 1)  # [B, S, H]: row-major like the data order
        counts = {kind: self._placeholders(input_ids, host_input_ids, token_id) for kind, token_id in (
            ("audio", self.audio_token_id), ("image", self.image_token_id), ("video", self.video_token_id))}

        if tower_outputs.audio is not None:
            embeds = self._scatter(embeds, input_ids == self.audio_token_id, tower_outputs.audio, "audio",
                                   counts["audio"])
        else:
            _check_count("audio", counts["audio"], 0)

        image, video = (self._found(input_ids, outputs, token_id, kind, counts[kind]) for outputs, token_id, kind in (
            (tower_outputs.image, self.image_token_id, "image"), (tower_outputs.video, self.video_token_id, "video")))
        for found, kind in ((image, "image"), (video, "video")):
            if found is not None:
                embeds = self._scatter(embeds, found[0], found[1], kind, counts[kind])

        visual_pos_masks, deepstack = self._joint_deepstack(image, video, counts["image"], counts["video"])
        return embeds.transpose(0, 1).contiguous(), visual_pos_masks, deepstack

    @staticmethod
    def _found(input_ids, outputs, token_id: int, kind: str, n_tokens: int):
        """(placeholder mask, embeds, deepstack levels) of one visual kind, None (and no placeholders) without it."""
        if outputs is None:
            _check_count(kind, n_tokens, 0)
            return None
        return input_ids == token_id, *outputs

    @staticmethod
    def _joint_deepstack(image, video, n_image: int, n_video: int):
        """Deepstack features of images and videos interleaved in sequence order (one list entry per level).
        `n_image`, `n_video`: the placeholder counts, so that the rows are found with sizes known on the host
        (`nonzero_static`; boolean indexing would read the count back from the GPU)."""
        present = [v for v in (image, video) if v is not None]
        if not present:
            return None, None
        if len(present) == 1:
            mask, _, deepstack = present[0]
            return mask, deepstack
        visual = image[0] | video[0]
        order = visual.reshape(-1).cumsum(0) - 1  # a visual token's row among the visual tokens, in sequence order
        image_rows, video_rows = (order[torch.nonzero_static(mask.reshape(-1), size=n).squeeze(1)]
                                  for mask, n in ((image[0], n_image), (video[0], n_video)))
        joint = []
        for image_level, video_level in zip(image[2], video[2]):
            level = image_level.new_zeros(n_image + n_video, image_level.shape[-1])
            level[image_rows] = image_level.to(level.dtype)
            level[video_rows] = video_level.to(level.dtype)
            joint.append(level)
        return visual, joint

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *, labels=None, loss_mask=None,
                packed_seq_params=None, padding_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, input_features=None, feature_attention_mask=None,
                audio_feature_lengths=None, host_input_ids=None, tower_outputs: Optional[TowerOutputs] = None):
        """Logits [B, S, V/tp] (labels None) or per-token loss [B, S] (labels = already shifted targets).

        Megatron conventions, not transformers': `labels[t]` is the target of position t (shifted by the data
        pipeline), `padding_mask` [B, S] is True on padding (kept out of MoE routing statistics), packing comes as
        THD `packed_seq_params`. Build these from a batch with `omni_model.train.forward_step.thinker_inputs`.
        Unknown keywords (e.g. transformers' `attention_mask`) are a TypeError, never silently ignored.
        `host_input_ids`: `input_ids` on the host (the training step passes them), for the placeholder counts.
        `tower_outputs`: this micro-batch's tower outputs computed beforehand (see embed_multimodal), media not given.
        """
        decoder_input = visual_pos_masks = deepstack = None
        if self.pre_process:
            decoder_input, visual_pos_masks, deepstack = self.embed_multimodal(
                input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, input_features,
                feature_attention_mask, audio_feature_lengths, host_input_ids, tower_outputs)
        return self.language_model(
            input_ids=input_ids, position_ids=position_ids, decoder_input=decoder_input, labels=labels,
            loss_mask=loss_mask, packed_seq_params=packed_seq_params, padding_mask=padding_mask,
            visual_pos_masks=visual_pos_masks, deepstack_visual_embeds=deepstack)


def build_thinker(hf_config, *, dtype: torch.dtype = torch.float32, use_te: bool = False,
                  layout=None, vision: bool = True, audio: bool = True, perform_initialization: bool = True,
                  options: PerfOptions = DEFAULT, **lm_kw) -> Qwen3OmniThinker:
    """This rank's thinker (after runtime.parallel.init_parallel). Encoders only on the first pipeline stage.
    `use_te`: the one TE decision (config `model.use_te`). `perform_initialization=False` leaves the weights
    uninitialised, for a model that a checkpoint fills next (conversion, loading). `options`: the performance switches
    (model.options.PerfOptions)."""
    thinker = thinker_config_of(hf_config)
    language_model = build_language_model(hf_config, dtype=dtype, use_te=use_te, layout=layout, options=options,
                                          perform_initialization=perform_initialization, **lm_kw)
    first_stage = language_model.pre_process
    # the towers follow the language model's placement (a meta-device build for conversion must stay off the GPU)
    tower_kw = {"params_dtype": dtype, "perform_initialization": perform_initialization,
                "use_cpu_initialization": lm_kw.get("use_cpu_initialization")}
    vision_model = audio_model = None
    if first_stage and vision and "vision_config" in thinker:
        vision_model = VisionEncoder(thinker, vision_transformer_config(thinker, **tower_kw), use_te=use_te)
    if first_stage and audio and "audio_config" in thinker:
        audio_model = AudioEncoder(thinker, _audio_config(thinker, **tower_kw), use_te=use_te)
    thinker_model = Qwen3OmniThinker(hf_config, language_model, vision_model, audio_model)
    return on_gpu_if_any(apply_options(thinker_model, options))


def _audio_config(thinker: dict, **overrides):
    """The audio tower's mcore config; its TP size follows the tower's own replicate rule (audio_replicated)."""
    tp = current_tp_size()
    return audio_transformer_config(thinker, tp_size=1 if audio_replicated(thinker, tp) else tp, **overrides)
