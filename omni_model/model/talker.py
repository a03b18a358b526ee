"""The Qwen3-Omni talker on Megatron-Core: text/hidden projections, the MoE decoder with shared experts, the code
predictor. Built from the thinker's machinery (model.specs layer specs, grouped-GEMM experts, the token dispatchers,
SDPA attention with THD packing, interleaved MRoPE, model.cross_entropy), so every layout and kernel choice of the
thinker applies.

transformers' `Qwen3OmniMoeTalkerForConditionalGeneration` (what this module equals, tests/test_talker_parity.py):

    talker input embeds [B, S, H]   (assembled as in `generate`: `inputs_embeds` below)
      -> decoder: 20 MoE layers, 128 experts top-6 + a sigmoid-gated shared expert, interleaved MRoPE, final norm
      -> codec_head: logits of the FIRST code group [B, S, 3072] (codec vocabulary incl. BOS/EOS/PAD/speaker ids)
    code predictor, per frame: [talker hidden h, codec_embedding(c0), embed_0(c1), ..., embed_13(c14)] (16 positions)
      -> 5 dense layers (plain 1-D RoPE from 0), final norm -> head_g(hidden at position g) = logits of group g (1..15)

Names (mcore side, this module's state dict; the mapping rows add the prefix `talker.`):

    text_projection.linear_fc{1,2}.{weight,bias}, hidden_projection.linear_fc{1,2}.{weight,bias}
    language_model.*               the decoder, a Qwen3OmniLanguageModel: embedding.word_embeddings = codec_embedding,
                                   output_layer = codec_head, decoder.layers.N.mlp.shared_experts.*
    code_predictor.decoder.*       TransformerBlock of dense layers (same layer names as the LLM's dense layers)
    code_predictor.embeddings.G.weight, code_predictor.heads.G.weight    G = 0..num_code_groups-2

Layouts: TP (with SP on the decoder, as MoE needs it; the code predictor and the projections run on full sequences,
tensor-parallel without SP), EP/ETP for the experts. No pipeline parallelism (the code predictor reads the decoder's
last hidden states; the talker is ~3B parameters, 0.3B active): asserted at build.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from ..configs import code_predictor_config_of, talker_config_of, talker_text_config_of
from .cross_entropy import vocab_parallel_cross_entropy
from .language_model import Qwen3OmniLanguageModel, build_language_model, current_layout, on_gpu_if_any
from .linear import LocalColumnParallelLinear, LocalRowParallelLinear
from .options import DEFAULT, PerfOptions, apply_options
from .rope import InterleavedMRoPE
from .specs import decoder_block_spec
from .transformer_config import build_transformer_config, rope_params
from .vision import MergerList


def _without_sequence_parallel(config):
    """A copy of `config` for modules that run on the full sequence (mcore's SharedExpertMLP copies its config the
    same way): TransformerConfig refuses MoE at TP > 1 without SP, so the copy is not re-validated."""
    config = copy.copy(config)
    config.sequence_parallel = False
    return config


class ResizeMLP(MegatronModule):
    """transformers' `Qwen3OmniMoeTalkerResizeMLP`: fc2(silu(fc1(x))), both with bias; fc1 column-, fc2 row-parallel
    (the weight names of mcore's MLP). Maps thinker width (embeddings or the accepted layer's hidden states) to talker
    width."""

    def __init__(self, config, input_size: int, ffn_hidden_size: int):
        super().__init__(config=config)
        self.linear_fc1 = LocalColumnParallelLinear(
            input_size, ffn_hidden_size, config=config, init_method=config.init_method, bias=True,
            gather_output=False, skip_bias_add=False)
        self.linear_fc2 = LocalRowParallelLinear(
            ffn_hidden_size, config.hidden_size, config=config, init_method=config.output_layer_init_method, bias=True,
            input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.linear_fc1(x)
        out, _ = self.linear_fc2(F.silu(hidden))
        return out


class CodePredictor(MegatronModule):
    """The code predictor: predicts code groups 1..G-1 of a frame from the talker's hidden state and group 0.

    Frames are independent sequences of the same length G, so a batch of N frames is the mcore layout [G, N, H]
    (no padding, no packing); causal SDPA over each column."""

    def __init__(self, config, predictor_cfg: dict, use_te: bool = False):
        super().__init__(config=config)
        groups = predictor_cfg["num_code_groups"]
        vocab, hidden = predictor_cfg["vocab_size"], predictor_cfg["hidden_size"]
        spec = decoder_block_spec(config, predictor_cfg, use_te=use_te)
        self.decoder = TransformerBlock(config=config, spec=spec, pre_process=True, post_process=True)
        # plain RoPE (positions 0..G-1 on every axis): the interleave with all frequencies on the T axis
        theta = rope_params(predictor_cfg)["rope_theta"]
        self.rotary_pos_emb = InterleavedMRoPE(config.kv_channels, theta, [config.kv_channels // 2, 0, 0])
        # MegatronModule lists (not nn.ModuleList): mcore's default sharded_state_dict of a ModuleList would save
        # these vocab-split tensors as replicated, so a checkpoint written at TP > 1 would keep rank 0's slice only
        self.embeddings = MergerList(config, [
            VocabParallelEmbedding(vocab, hidden, init_method=config.init_method, config=config)
            for _ in range(groups - 1)])
        self.heads = MergerList(config, [
            LocalColumnParallelLinear(hidden, vocab, config=config, init_method=config.init_method, bias=False,
                                      gather_output=False, skip_bias_add=False)
            for _ in range(groups - 1)])
        self.num_code_groups = groups

    def embed_group(self, group: int, codes: torch.Tensor) -> torch.Tensor:
        """Embeddings of codes of group `group` >= 1 (any shape) -> [..., H]."""
        return self.embeddings[group - 1](codes)

    def forward(self, first_inputs: torch.Tensor) -> torch.Tensor:
        """first_inputs [2 + (G-2), N, H]: [talker hidden, group-0 embedding, embeddings of groups 1..G-2] ->
        this rank's vocab slice of the logits of groups 1..G-1, [G-1, N, V/tp]."""
        g, n, _ = first_inputs.shape
        positions = torch.arange(g, device=first_inputs.device).view(1, g)
        hidden = self.decoder(hidden_states=first_inputs, attention_mask=None,
                              rotary_pos_emb=self.rotary_pos_emb(positions))  # [G, N, H], final norm applied
        return torch.stack([self.heads[k](hidden[k + 1])[0] for k in range(g - 1)])


@dataclass
class TalkerOutput:
    """`first`: logits [B, S, V/tp] of the first code group, or its per-token loss [B, S] when labels were given;
    `residual`: logits [G-1, N, V/tp] of groups 1..G-1 of each frame, or their loss [G-1, N] when codes were given
    (None without frames). Vocab slices are this TP rank's (`gather_logits` for the full vocabulary)."""

    first: torch.Tensor
    residual: Optional[torch.Tensor]


class Qwen3OmniTalker(MegatronModule):
    def __init__(self, hf_config, language_model: Qwen3OmniLanguageModel, code_predictor: CodePredictor,
                 projection_config):
        super().__init__(config=language_model.config)
        talker = talker_config_of(hf_config)
        text = talker_text_config_of(hf_config)
        self.language_model = language_model
        self.code_predictor = code_predictor
        self.text_projection = ResizeMLP(projection_config, talker["thinker_hidden_size"], text["intermediate_size"])
        self.hidden_projection = ResizeMLP(projection_config, talker["thinker_hidden_size"], text["intermediate_size"])
        self.num_code_groups = talker["num_code_groups"]
        # what mcore's schedules and finalize_model_grads read off the model they wrap (GPTModel's interface)
        self.model_type = language_model.model_type
        self.share_embeddings_and_output_weights = language_model.share_embeddings_and_output_weights
        self.pre_process = self.post_process = True

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    # -- inputs -----------------------------------------------------------------------------------------------------
    def codec_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum over groups of the codec embeddings of `codes` [B, S, G'] (G' <= G groups, -1 = no code in that group)
        -> [B, S, H]: group 0 through the decoder's codec_embedding, group g >= 1 through the predictor's embedding
        g-1. A frame fed back to the talker carries all G groups; the prompt's special codec ids group 0 only."""
        present = codes >= 0
        safe = codes.clamp(min=0)
        total = self.language_model.embed(safe[..., 0]).transpose(0, 1) * present[..., :1]  # embed: [S, B, H]
        for group in range(1, codes.shape[-1]):
            total = total + self.code_predictor.embed_group(group, safe[..., group]) * present[..., group:group + 1]
        return total

    def inputs_embeds(self, thinker_embeds: torch.Tensor, codec_codes: torch.Tensor,
                      multimodal_mask: Optional[torch.Tensor] = None,
                      thinker_hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The talker's input [B, S, H] as `generate` assembles it: text_projection of the thinker's token embeddings
        [B, S, Ht], except at `multimodal_mask` [B, S] where hidden_projection of the accepted layer's hidden states
        (`thinker_hidden` [n_multimodal, Ht], row-major order) stands; plus the codec embeddings of `codec_codes`."""
        text = self.text_projection(thinker_embeds)
        if multimodal_mask is not None and bool(multimodal_mask.any()):
            projected = self.hidden_projection(thinker_hidden).to(text.dtype)
            text = text.masked_scatter(multimodal_mask[..., None].expand_as(text), projected)
        return text + self.codec_embeddings(codec_codes)

    # -- forward ----------------------------------------------------------------------------------------------------
    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, *, labels=None, packed_seq_params=None,
                padding_mask=None, frame_positions: Optional[torch.Tensor] = None,
                frame_codes: Optional[torch.Tensor] = None, predict_frames: bool = True) -> TalkerOutput:
        """inputs_embeds [B, S, H] (`inputs_embeds(...)`), position_ids [3, B, S] (MRoPE) or [B, S];
        labels [B, S]: already shifted first-group targets -> per-token loss (mask it outside, e.g. labels -100 ->
        any id and a loss mask); frame_positions [N]: flat indices b * S + s of the positions whose hidden state
        predicts frame n (the position whose first-group target is frame_codes[n, 0]); frame_codes [N, G].
        With frames: `residual` holds the code predictor's logits, or its per-code loss when labels are given."""
        first, hidden = self.language_model(
            decoder_input=inputs_embeds.transpose(0, 1).contiguous(), position_ids=position_ids, labels=labels,
            packed_seq_params=packed_seq_params, padding_mask=padding_mask, return_hidden=True)
        if frame_positions is None or not predict_frames:
            return TalkerOutput(first, None)
        logits = self.code_predictor(self._predictor_inputs(hidden, frame_positions, frame_codes))
        if labels is None:
            return TalkerOutput(first, logits)
        targets = frame_codes[:, 1:].transpose(0, 1).contiguous()  # [G-1, N]
        return TalkerOutput(first, vocab_parallel_cross_entropy(
            logits, targets, self.language_model.pg_collection.tp, fuse_on_gpu=self.language_model.fuse_ce_on_gpu))

    def _predictor_inputs(self, hidden: torch.Tensor, frame_positions: torch.Tensor, frame_codes: torch.Tensor):
        """[G, N, H]: the talker's final hidden state at each frame position, then the frame's codes 0..G-2 embedded."""
        if self.config.sequence_parallel:
            # every TP rank runs the (TP-split, not SP) predictor on all frames; its input grads arrive whole on
            # every rank, so the backward keeps this rank's slice (no sum over ranks)
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        rows = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1]).index_select(0, frame_positions)  # [N, H]
        first = self.language_model.embed(frame_codes[:, :1].contiguous())  # [1, N, H] (ids as [B=N, S=1])
        groups = [self.code_predictor.embed_group(g, frame_codes[:, g]) for g in range(1, self.num_code_groups - 1)]
        return torch.cat([rows[None], first.to(rows.dtype), torch.stack(groups).to(rows.dtype)], dim=0)


def gather_logits(logits: torch.Tensor) -> torch.Tensor:
    """The full-vocabulary logits from this rank's vocab slice (TP ranks)."""
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)


def talker_transformer_configs(hf_config, layout=None, *, dtype=torch.float32, perform_initialization: bool = True,
                               **overrides):
    """(decoder config, code predictor config, projection config) for this layout."""
    layout = layout or current_layout()
    if layout.pp > 1:
        raise ValueError(f"the talker runs without pipeline parallelism (parallel.pp = {layout.pp}): its code "
                         f"predictor reads the decoder's last hidden states")
    decoder = build_transformer_config(talker_text_config_of(hf_config), layout, dtype=dtype, shared_expert=True,
                                       perform_initialization=perform_initialization, **overrides)
    predictor_overrides = {k: v for k, v in overrides.items() if not k.startswith("moe_")}
    # dense: no SP (its [G, N] frames are short; the decoder's MoE is what needs SP at TP > 1), no expert layout
    # (mcore refuses an expert-parallel size without experts)
    predictor = build_transformer_config(code_predictor_config_of(hf_config), layout, dtype=dtype,
                                         perform_initialization=perform_initialization, sequence_parallel=False,
                                         expert_model_parallel_size=1, expert_tensor_parallel_size=1,
                                         **predictor_overrides)
    return decoder, predictor, _without_sequence_parallel(decoder)


def build_talker(hf_config, *, dtype: torch.dtype = torch.float32, use_te: bool = False, layout=None,
                 perform_initialization: bool = True, options: PerfOptions = DEFAULT,
                 config_overrides: Optional[dict] = None) -> Qwen3OmniTalker:
    """This rank's talker (after runtime.parallel.init_parallel). `hf_config`: the full config (dict / dir)."""
    text = talker_text_config_of(hf_config)
    _, predictor_config, projection_config = talker_transformer_configs(
        hf_config, layout, dtype=dtype, perform_initialization=perform_initialization, **(config_overrides or {}))
    language_model = build_language_model(text, dtype=dtype, use_te=use_te, layout=layout, num_deepstack=0,
                                          options=options, shared_expert=True,
                                          perform_initialization=perform_initialization,
                                          config_overrides=config_overrides)
    predictor = CodePredictor(predictor_config, code_predictor_config_of(hf_config), use_te=use_te)
    talker = Qwen3OmniTalker(hf_config, language_model, predictor, projection_config)
    return on_gpu_if_any(apply_options(talker, options))

