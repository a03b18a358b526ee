"""Qwen3-Omni audio encoder (AuT, Whisper-like) on Megatron-Core.

    mel [128, frames] per clip --split into chunks of 2*n_window (=100) frames, zero-padded to the longest chunk-->
      3 x (Conv2d 3x3 stride 2 + GELU) over (mel, time) -> conv_out (Linear, no bias) -> + sinusoidal positions
      (restarting in every chunk) -> drop the padded positions (13 tokens per full chunk)
      --32 x pre-LN layer (attention inside windows of 13 * n_window_infer/(2*n_window) = 104 tokens of one clip,
        GELU MLP)--> ln_post -> proj1 -> GELU -> proj2 -> [sum of output lengths, output_dim]

Inputs as transformers gives them: `input_features` [n, 128, T] + `feature_attention_mask` [n, T] (the
WhisperFeatureExtractor/processor batch), or already concatenated [128, sum(lens)] + `feature_lens` [n].

HF quirk kept on purpose (parity): chunks are padded to the longest chunk *of the batch* before the convolutions,
so the last (partial) chunk of a clip sees conv activations of padding frames when the batch also holds a full
chunk; a clip alone shorter than 100 frames is padded only to its own length. That is what transformers (and the
released code) compute, so the fine-tuned model sees the same features at inference.

Tensor parallelism: the transformer layers are mcore TransformerLayers (qkv/proj/fc1/fc2 split over TP ranks)
when TP divides the 20 heads and the FFN; otherwise (`replicate=True`, default when TP does not divide, e.g. TP=8)
the whole tower is a full copy on every TP rank, built with size-1 TP groups. The conv stem (~12M parameters at
the 30B shape), ln_post and proj1/proj2 (~4M) are replicated either way.
"""

from __future__ import annotations

import math
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
    host_to_device,
    mark_replicated,
    packed_seq_params,
    plain_param_device,
    run_layers,
    tp_world_size,
)
from .transformer_config import audio_config_of, current_tp_size
from .audio_lengths import audio_output_lengths, conv_out_length  # the one definition (the data side counts tokens)


def audio_replicated(config: Any, tp: int) -> bool:
    """Whether the audio tower is a full copy per TP rank at tensor-parallel size `tp` (TP must divide the heads and
    the FFN to split it; the released 20 heads split at TP 1/2/4/5/10/20, not at TP=8). The single source of this
    decision for the model (`AudioEncoder(replicate=None)`) and the mapping (`encoder_rows.encoder_rules_for`)."""
    a = audio_config_of(config)
    return tp > 1 and (a["encoder_attention_heads"] % tp != 0 or a["encoder_ffn_dim"] % tp != 0)


def audio_transformer_config(config: Any, *, tp_size: Optional[int] = None, params_dtype=torch.float32,
                             **overrides) -> TransformerConfig:
    a = audio_config_of(config)
    act = a.get("activation_function", "gelu")
    assert act == "gelu", f"AuT uses exact GELU, got {act}"
    return encoder_transformer_config(
        num_layers=a["encoder_layers"],
        hidden_size=a["d_model"],
        num_heads=a["encoder_attention_heads"],
        ffn_hidden_size=a["encoder_ffn_dim"],
        activation_func=F.gelu,
        layernorm_epsilon=1e-5,
        tp_size=current_tp_size() if tp_size is None else tp_size,
        params_dtype=params_dtype,
        **overrides,
    )


def sinusoid_positions(length: int, channels: int, max_timescale: float = 10000.0, device=None) -> torch.Tensor:
    """Whisper/AuT sinusoidal table [length, channels] (fp32): cat(sin, cos) with log-spaced timescales."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, device=device).float())
    t = torch.arange(length, device=device)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


class AudioEncoder(MegatronModule):
    """AuT audio tower of Qwen3-Omni.

    Args:
        config: HF config (top-level, thinker or `audio_config`; dict or PretrainedConfig).
        transformer_config: mcore config of the layers (default `audio_transformer_config(config)`, fp32).
        use_te: TE layer spec (the one TE decision, `model.use_te`; default: the local spec).
        pg_collection: process groups (default: `encoder_process_groups(replicate)`).
        replicate: full copy on every TP rank (default: when TP does not divide heads / FFN).

    forward(input_features, feature_lens=None, feature_attention_mask=None) -> [sum(audio_output_lengths), output_dim]
    State-dict names: `conv2d{1,2,3}.*`, `conv_out.weight`, `decoder.layers.{i}.*`, `ln_post.*`, `proj1.*`,
    `proj2.*` (see omni_model.convert.encoder_rows).
    """

    def __init__(self, config: Any, transformer_config: Optional[TransformerConfig] = None,
                 use_te: bool = False, pg_collection: Optional[ProcessGroupCollection] = None,
                 replicate: Optional[bool] = None):
        a = audio_config_of(config)
        tp = current_tp_size()
        if replicate is None:
            replicate = audio_replicated(a, tp)
        if transformer_config is None:
            transformer_config = audio_transformer_config(a, tp_size=1 if replicate else tp)
        super().__init__(config=transformer_config)
        tconfig = transformer_config
        self.hf_config = a
        self.replicate = replicate
        self.pg_collection = pg_collection or encoder_process_groups(replicate=replicate)
        assert tconfig.tensor_model_parallel_size == tp_world_size(self.pg_collection)
        self.n_window = a["n_window"]
        self.n_window_infer = a["n_window_infer"]
        self.conv_chunksize = a.get("conv_chunksize", 500)
        self.d_model = a["d_model"]
        self.num_mel_bins = a["num_mel_bins"]
        self.recompute = tconfig.recompute_granularity == "full"
        ds = a["downsample_hidden_size"]

        kw = dict(device=plain_param_device(tconfig), dtype=tconfig.params_dtype)
        self.conv2d1 = nn.Conv2d(1, ds, 3, 2, padding=1, **kw)
        self.conv2d2 = nn.Conv2d(ds, ds, 3, 2, padding=1, **kw)
        self.conv2d3 = nn.Conv2d(ds, ds, 3, 2, padding=1, **kw)
        freq = conv_out_length(self.num_mel_bins, 3)
        self.conv_out = nn.Linear(ds * freq, self.d_model, bias=False, **kw)
        self.decoder = TransformerBlock(tconfig, encoder_layer_spec(use_te), post_layer_norm=False,
                                        pg_collection=self.pg_collection)
        self.ln_post = nn.LayerNorm(self.d_model, **kw)
        self.proj1 = nn.Linear(self.d_model, self.d_model, **kw)
        self.proj2 = nn.Linear(self.d_model, a["output_dim"], **kw)
        if replicate:
            mark_replicated(self)

    def set_input_tensor(self, input_tensor) -> None:  # pragma: no cover - trivial
        pass

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """mcore dist-checkpoint view. A replicated tower's linears see a size-1 TP group, so mcore would mark the
        copy on every TP rank as the main replica; re-tag them as TP replicas (only TP rank 0 writes)."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.replicate and torch.distributed.is_initialized():
            from megatron.core import parallel_state
            from megatron.core.dist_checkpointing.dict_utils import nested_values

            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
            for v in nested_values(sd):
                if hasattr(v, "replica_id"):
                    v.replica_id = (0, tp_rank, dp_rank)
        return sd

    def output_lengths(self, input_lengths):
        return audio_output_lengths(input_lengths, self.n_window)

    @property
    def window_tokens(self) -> int:
        """Attention window in encoder tokens: 13 per 2*n_window-frame chunk, n_window_infer/(2*n_window) chunks.

        transformers derives it from the longest padded chunk of the batch; the two agree whenever a window can
        matter (a clip longer than one window always has a full chunk)."""
        chunk = self.n_window * 2
        return int(audio_output_lengths(chunk, self.n_window)) * (self.n_window_infer // chunk)

    @staticmethod
    def flatten_batch(input_features: torch.Tensor, feature_lens=None, feature_attention_mask=None):
        """[n, mel, T] (+ mask or lens) or [mel, total] (+ lens) -> ([mel, total], lens [n] long)."""
        if input_features.dim() == 3:
            n, _, t = input_features.shape
            if feature_attention_mask is not None:
                mask = feature_attention_mask.bool()
                lens = mask.sum(-1)
                flat = input_features.permute(0, 2, 1)[mask].permute(1, 0)
            else:
                lens = torch.as_tensor(feature_lens if feature_lens is not None else [t] * n)
                flat = torch.cat([input_features[i, :, : int(l)] for i, l in enumerate(lens.tolist())], dim=1)
            return flat, lens.to("cpu", torch.long)
        if feature_lens is None:
            feature_lens = [input_features.shape[1]]
        return input_features, torch.as_tensor(feature_lens).to("cpu", torch.long).reshape(-1)

    def forward(self, input_features: torch.Tensor, feature_lens=None, feature_attention_mask=None) -> torch.Tensor:
        feats, lens = self.flatten_batch(input_features, feature_lens, feature_attention_mask)
        device = self.conv2d1.weight.device
        chunk = self.n_window * 2

        # chunks of `chunk` frames per clip (last one partial), padded to the longest chunk of the batch
        n_chunks = (lens + chunk - 1) // chunk
        chunk_lens = []
        for l, c in zip(lens.tolist(), n_chunks.tolist()):
            chunk_lens += [chunk] * (c - 1) + [l - chunk * (c - 1)]
        chunk_lens = torch.tensor(chunk_lens, dtype=torch.long)
        pieces = feats.to(device).T.split(chunk_lens.tolist(), dim=0)
        padded = nn.utils.rnn.pad_sequence(pieces, batch_first=True).transpose(1, 2)  # [chunks, mel, Lmax]
        x = padded.unsqueeze(1).to(self.conv2d1.weight.dtype)

        outs = []
        for part in x.split(self.conv_chunksize, dim=0):
            h = F.gelu(self.conv2d1(part))
            h = F.gelu(self.conv2d2(h))
            h = F.gelu(self.conv2d3(h))
            outs.append(h)
        h = torch.cat(outs, dim=0)
        b, c, f, t = h.shape
        h = self.conv_out(h.permute(0, 3, 1, 2).reshape(b, t, c * f))
        h = h + sinusoid_positions(t, self.d_model, device=h.device).to(h.dtype)[None]

        valid_per_chunk = conv_out_length(chunk_lens, 3)
        keep = (torch.arange(t)[None, :] < valid_per_chunk[:, None]).reshape(-1)
        h = h.reshape(b * t, -1)[host_to_device(keep.nonzero().squeeze(-1), h.device)]

        # attention windows: per clip, `window_tokens` tokens each, remainder last
        win = self.window_tokens
        seg = []
        for n_out in audio_output_lengths(lens, self.n_window).tolist():
            seg += [win] * (n_out // win) + ([n_out % win] if n_out % win else [])
        seg = torch.tensor(seg, dtype=torch.long)
        cu = F.pad(seg.cumsum(0), (1, 0))
        packed = packed_seq_params(host_to_device(cu, h.device), int(seg.max()))

        h = run_layers(self.decoder.layers, h.unsqueeze(1), packed=packed,
                       recompute=self.recompute and self.training).squeeze(1)
        h = self.ln_post(h)
        h = self.proj2(F.gelu(self.proj1(h)))
        return h
