"""Qwen3-Omni vision encoder (the Qwen3-VL ViT of the thinker) on Megatron-Core.

    pixel_values [N, C*T*P*P] --patch_embed--> [N, hidden] + interpolated learned pos-embed
      --27 x (LN -> attn with 2D RoPE, per image / per video frame) -> LN -> GELU-tanh MLP)-->
      merger: LN(hidden) -> view groups of merge^2 patches -> fc1 -> GELU -> fc2   -> embeds [N/merge^2, out_hidden]
      after layers in `deepstack_visual_indexes`: deepstack merger k (LN over the merged 4*hidden vector)
                                                                                 -> deepstack_embeds[k]

Input conventions are transformers' (`Qwen2VLImageProcessor`/`Qwen3OmniMoeProcessor` output): patches flattened as
(C, T, P, P), listed per image/video in spatial-merge-block order; `grid_thw` rows (t, h, w) in patches. The
deepstack features are added by the LLM to the hidden states of its first `len(deepstack_visual_indexes)` layers
at the visual token positions (the lead's thinker does that).

Tensor parallelism: the transformer layers are mcore `TransformerLayer`s (column/row parallel qkv/proj/fc1/fc2,
heads split across TP ranks); the four mergers are column(fc1)/row(fc2) parallel too (4 x 4608^2 weights at 30B
shape). Patch embed, pos-embed and LayerNorms are replicated (small). Sequence parallelism is not used inside the
tower: its output must be whole on every TP rank for the multimodal merge anyway.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from .encoder_layers import (
    encoder_layer_spec,
    encoder_process_groups,
    encoder_transformer_config,
    gelu_tanh,
    host_to_device,
    packed_seq_params,
    plain_param_device,
    run_layers,
    tp_world_size,
)
from .linear import LocalColumnParallelLinear, LocalRowParallelLinear
from .rope import RotaryTables, RotaryTableSelfAttention
from .transformer_config import current_tp_size, vision_config_of

_ACTIVATIONS = {
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "gelu": F.gelu,
    "silu": F.silu,
}


def vision_transformer_config(config: Any, *, tp_size: Optional[int] = None, params_dtype=torch.float32,
                              **overrides) -> TransformerConfig:
    """mcore TransformerConfig of the ViT blocks from an HF config (top-level, thinker or `vision_config`)."""
    v = vision_config_of(config)
    return encoder_transformer_config(
        num_layers=v["depth"],
        hidden_size=v["hidden_size"],
        num_heads=v["num_heads"],
        ffn_hidden_size=v["intermediate_size"],
        activation_func=_ACTIVATIONS[v.get("hidden_act", "gelu_pytorch_tanh")],
        layernorm_epsilon=1e-6,
        tp_size=current_tp_size() if tp_size is None else tp_size,
        params_dtype=params_dtype,
        **overrides,
    )


# ---------------------------------------------------------------------------------------------------------------
# grid helpers (pure functions of grid_thw; also usable by the data side)
# ---------------------------------------------------------------------------------------------------------------


def vision_cu_seqlens(grid_thw: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Attention segments: one per temporal patch of every image/video (h*w patches each). -> (cu_seqlens int32, max)."""
    grid = grid_thw.to("cpu", torch.long)
    seqlens = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])
    cu = F.pad(seqlens.cumsum(0), (1, 0)).to(torch.int32)
    return cu, int(seqlens.max()) if seqlens.numel() else 0


def _patch_coordinates(grid_thw: torch.Tensor, merge: int, device=None):
    """(row, col, frame height, frame width) of every patch of every image/video, patches listed per item in
    spatial-merge-block order (block_row, block_col, in_row, in_col) and repeated over t. Vectorised over all items:
    a micro-batch holds dozens of images and video frames, and a per-item loop of small host ops cost ~14 ms of host
    time per micro-batch (2-core dev box), host time that the launch-bound multimodal step waits for."""
    grid = grid_thw.to(device or "cpu", torch.long)
    counts = grid.prod(-1)
    heights = torch.repeat_interleave(grid[:, 1], counts)
    widths = torch.repeat_interleave(grid[:, 2], counts)
    item_starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    in_frame = (torch.arange(int(counts.sum()), device=grid.device) - item_starts) % (heights * widths)
    block, in_block = in_frame // (merge * merge), in_frame % (merge * merge)
    blocks_per_row = widths // merge
    rows = (block // blocks_per_row) * merge + in_block // merge
    cols = (block % blocks_per_row) * merge + in_block % merge
    return rows, cols, heights, widths


def patch_layout(grid_thw: torch.Tensor, num_grid_per_side: int, merge: int, device=None):
    """What the tower needs of every patch's place, from one decoding of the grids (patches in merge-block order,
    repeated over t):

    -> (positions [N, 2] (row, col): the 2D rotary embedding's; indices [N, 4] long into the flattened pos-embed table
    and weights [N, 4] fp32: the bilinear (align_corners=True) resampling of the square learned table to each frame's
    h x w grid, the same closed form as transformers' `get_vision_interpolation_indices_and_weights(mode="bilinear",
    align_corners=True)` (Qwen3-VL's `fast_pos_embed_interpolate`)).
    """
    side = num_grid_per_side
    rows, cols, heights, widths = _patch_coordinates(grid_thw, merge, device)
    two = torch.arange(2, device=rows.device)

    def axis(index, size):
        # source position of each target index along one axis: endpoints map to 0 and side - 1
        src = index.float() * (side - 1) / (size - 1).clamp(min=1)
        floor = torch.floor(src)
        taps = floor.long()[:, None] + two
        weights = (1 - (src[:, None] - floor[:, None] - two).abs()).clamp(min=0)
        return taps.clamp(0, side - 1), weights

    row_taps, row_weights = axis(rows, heights)
    col_taps, col_weights = axis(cols, widths)
    indices = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
    weights = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
    return torch.stack([rows, cols], dim=-1), indices, weights


def vision_rotary_freqs(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """2D axial RoPE angles in mcore's layout: [N, 1, 1, head_dim] = cat(f_row, f_col, f_row, f_col), fp32.

    Each of row/col rotates head_dim/4 frequency pairs with inv_freq = theta^(-2i/(head_dim/2)) (Qwen3-VL).
    mcore applies it with rotate-half (non-interleaved), like transformers' `apply_rotary_pos_emb_vision`.
    """
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float32, device=positions.device) / spatial))
    f = positions.float()[..., None] * inv_freq  # [N, 2, spatial/2]
    fhw = torch.cat([f[:, 0], f[:, 1]], dim=-1)
    return torch.cat([fhw, fhw], dim=-1)[:, None, None, :]


# ---------------------------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------------------------


class VisionPatchEmbed(nn.Module):
    """Conv3d(kernel = stride = (T, P, P)) on one patch == a linear map of the flattened (C, T, P, P) patch.

    The weight keeps the Conv3d shape [hidden, C, T, P, P] (HF checkpoint layout, identity mapping); forward is a
    single GEMM (faster than cuDNN conv3d in bf16 and exact to rounding).
    """

    def __init__(self, in_channels: int, temporal_patch_size: int, patch_size: int, hidden: int, dtype, device=None):
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(hidden, in_channels, temporal_patch_size, patch_size, patch_size,
                                                    dtype=dtype, device=device))
        self.proj.bias = nn.Parameter(torch.empty(hidden, dtype=dtype, device=device))
        self.in_features = in_channels * temporal_patch_size * patch_size * patch_size
        self.hidden = hidden
        self.reset_parameters()

    def reset_parameters(self):
        if self.proj.weight.is_meta:
            return
        fan_in = self.in_features
        bound = 1.0 / fan_in**0.5
        with torch.no_grad():
            nn.init.uniform_(self.proj.weight, -bound, bound)
            nn.init.uniform_(self.proj.bias, -bound, bound)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        x = pixel_values.reshape(-1, self.in_features).to(w.dtype)
        return F.linear(x, w.reshape(self.hidden, -1), self.proj.bias)


class VisionPatchMerger(MegatronModule):
    """LayerNorm + 2-layer MLP over groups of merge^2 neighbouring patches (Qwen3-VL `PatchMerger`).

    `postshuffle_norm=False` (final merger): LN over each patch (hidden) before grouping.
    `postshuffle_norm=True` (deepstack mergers): LN over the grouped merge^2*hidden vector.
    fc1 column-parallel, fc2 row-parallel; the GELU between them is exact (erf), as in HF (`nn.GELU()`).
    """

    def __init__(self, config: TransformerConfig, hidden: int, out_hidden: int, merge: int, postshuffle_norm: bool,
                 tp_group=None):
        super().__init__(config=config)
        self.merged = hidden * merge * merge
        self.postshuffle_norm = postshuffle_norm
        device = plain_param_device(config)
        self.ln_q = nn.LayerNorm(self.merged if postshuffle_norm else hidden, eps=1e-6, device=device,
                                 dtype=config.params_dtype)
        self.linear_fc1 = LocalColumnParallelLinear(
            self.merged, self.merged, config=config, init_method=config.init_method, bias=True,
            gather_output=False, skip_bias_add=False, is_expert=False, tp_group=tp_group,
        )
        self.linear_fc2 = LocalRowParallelLinear(
            self.merged, out_hidden, config=config, init_method=config.output_layer_init_method, bias=True,
            input_is_parallel=True, skip_bias_add=False, is_expert=False, tp_group=tp_group,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1])
        if self.postshuffle_norm:
            x = self.ln_q(x.reshape(-1, self.merged))
        else:
            x = self.ln_q(x).reshape(-1, self.merged)
        h, _ = self.linear_fc1(x.unsqueeze(1))
        h = F.gelu(h)
        out, _ = self.linear_fc2(h)
        return out.squeeze(1)


class MergerList(MegatronModule):
    """A list of mergers that is also a MegatronModule: mcore's default `sharded_state_dict` of a plain
    nn.ModuleList would save the TP-sharded fc1/fc2 of the deepstack mergers as if they were replicated (only TP
    rank 0's shard would survive a dist checkpoint). State-dict names stay `<name>.<k>.*`."""

    def __init__(self, config: TransformerConfig, mergers):
        super().__init__(config=config)
        for k, m in enumerate(mergers):
            self.add_module(str(k), m)

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, k: int):
        return self._modules[str(k)]


class VisionEncoder(MegatronModule):
    """Qwen3-VL ViT of Qwen3-Omni with final merger and deepstack mergers.

    Args:
        config: HF config (top-level, thinker or `vision_config`; dict or PretrainedConfig).
        transformer_config: mcore config of the blocks (default: `vision_transformer_config(config)`, fp32, TP from
            `parallel_state` when initialised). Pass one with `params_dtype=torch.bfloat16` for bf16 training.
        use_te: TE layer spec (the one TE decision, `model.use_te`; default: the local spec).
        pg_collection: process groups (default: `encoder_process_groups()`).

    forward(pixel_values [N, C*T*P*P], grid_thw [n, 3]) -> (embeds [N/merge^2, out_hidden],
                                                           [deepstack_k [N/merge^2, out_hidden] for each k])
    State-dict names: `patch_embed.proj.*`, `pos_embed.weight`, `decoder.layers.{i}.*` (mcore TransformerLayer),
    `merger.{ln_q,linear_fc1,linear_fc2}.*`, `deepstack_mergers.{k}.*` (see omni_model.convert.encoder_rows).
    """

    def __init__(self, config: Any, transformer_config: Optional[TransformerConfig] = None,
                 use_te: bool = False, pg_collection: Optional[ProcessGroupCollection] = None):
        v = vision_config_of(config)
        tconfig = transformer_config or vision_transformer_config(v)
        super().__init__(config=tconfig)
        self.hf_config = v
        self.pg_collection = pg_collection or encoder_process_groups()
        tp = tp_world_size(self.pg_collection)
        assert tconfig.tensor_model_parallel_size == tp, (tconfig.tensor_model_parallel_size, tp)
        self.hidden = v["hidden_size"]
        self.num_heads = v["num_heads"]
        self.head_dim = self.hidden // self.num_heads
        self.merge = v["spatial_merge_size"]
        self.patch_size = v["patch_size"]
        self.temporal_patch_size = v["temporal_patch_size"]
        self.in_channels = v.get("in_channels", 3)
        self.out_hidden = v["out_hidden_size"]
        self.deepstack_visual_indexes = tuple(v.get("deepstack_visual_indexes") or ())
        self.num_grid_per_side = int(v["num_position_embeddings"] ** 0.5)
        rope = v.get("rope_parameters") or {}
        self.rope_theta = float(rope.get("rope_theta", v.get("rope_theta", 10000.0)))
        self.recompute = tconfig.recompute_granularity == "full"
        self.rope_tables = True  # PerfOptions.tower_rope_tables (apply_options sets it)
        self.fused_rope = True  # PerfOptions.fused_rope

        device = plain_param_device(tconfig)
        dtype = tconfig.params_dtype
        self.patch_embed = VisionPatchEmbed(self.in_channels, self.temporal_patch_size, self.patch_size, self.hidden,
                                            dtype, device)
        self.pos_embed = nn.Embedding(v["num_position_embeddings"], self.hidden, device=device, dtype=dtype)
        self.decoder = TransformerBlock(tconfig, encoder_layer_spec(use_te), post_layer_norm=False,
                                        pg_collection=self.pg_collection)
        tp_group = self.pg_collection.tp
        self.merger = VisionPatchMerger(tconfig, self.hidden, self.out_hidden, self.merge, False, tp_group)
        self.deepstack_mergers = MergerList(tconfig, [
            VisionPatchMerger(tconfig, self.hidden, self.out_hidden, self.merge, True, tp_group)
            for _ in self.deepstack_visual_indexes
        ])

    def use_options(self, options) -> None:
        self.rope_tables = options.tower_rope_tables
        self.fused_rope = options.fused_rope

    # the mcore pipeline schedule calls this on every model chunk; the tower is never split across stages
    def set_input_tensor(self, input_tensor) -> None:  # pragma: no cover - trivial
        pass

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        device = self.pos_embed.weight.device
        grid_thw = grid_thw.to("cpu", torch.long)
        cu_seqlens, max_seqlen = vision_cu_seqlens(grid_thw)
        positions, interp_idx, interp_w = patch_layout(grid_thw, self.num_grid_per_side, self.merge)

        x = self.patch_embed(pixel_values.to(device))
        interp_idx, interp_w = host_to_device(interp_idx, device), host_to_device(interp_w, device)
        pos = (self.pos_embed(interp_idx) * interp_w[:, :, None]).sum(1)
        x = x + pos.to(x.dtype)
        rotary = vision_rotary_freqs(host_to_device(positions, device), self.head_dim, self.rope_theta)
        if self.rope_tables and isinstance(self.decoder.layers[0].self_attention, RotaryTableSelfAttention):
            rotary = RotaryTables.from_angles(rotary, x.dtype, fused=self.fused_rope)
        packed = packed_seq_params(host_to_device(cu_seqlens, device), max_seqlen)

        deepstack: list[torch.Tensor] = []
        taps = {layer: k for k, layer in enumerate(self.deepstack_visual_indexes)}

        def on_collect(i, h):
            deepstack.append(self.deepstack_mergers[taps[i]](h))

        h = run_layers(self.decoder.layers, x.unsqueeze(1), rotary_pos_emb=rotary, packed=packed,
                       recompute=self.recompute and self.training, collect=tuple(taps), on_collect=on_collect)
        embeds = self.merger(h)
        return embeds, deepstack
