"""The Qwen3-Omni thinker LLM on Megatron-Core: `GPTModel` with interleaved MRoPE and deepstack.

Build (after `omni_model.runtime.parallel.init_parallel(...)` so that mcore's parallel_state exists):

    from omni_model.model.language_model import build_language_model
    model = build_language_model(hf_config_or_dir, dtype=torch.float32)         # layout from parallel_state

Forward (mcore layout [S, B, H] inside; logits come back [B, S, V/tp] like GPTModel, or per-token loss [B, S]
when `labels` is given):

    logits = model(input_ids=ids,                      # [B, S]   (or decoder_input=embeds [S, B, H], full sequence)
                   position_ids=pos,                   # [3, B, S] MRoPE ids (text-only: arange broadcast), or [B, S]
                   packed_seq_params=psp,              # optional THD packing (B == 1, cu_seqlens over S)
                   visual_pos_masks=mask,              # optional [B, S] bool, visual token positions
                   deepstack_visual_embeds=[f0, f1, f2])  # optional list of [n_visual, H], added after layers 0,1,2

`decoder_input` is the FULL sequence [S, B, H] (e.g. `model.embed(input_ids)` with multimodal features merged in);
the model scatters it (and the deepstack features) over the TP ranks itself when sequence parallelism is on.
Deepstack needs every deepstack layer (0..n-1) on the first pipeline stage (asserted at build): the features are
produced by the vision tower on stage 0 and are not carried across stages. Context parallelism (model.context_parallel):
with a CP `packed_seq_params` the full-row decoder input and deepstack features are cut to this rank's zig-zag chunks
here; positions, labels and masks arrive already cut (train.forward_step).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from .attention import per_token_rope_packing
from .chunked_loss import chunked_lm_loss
from .context_parallel import local_rows
from .cross_entropy import vocab_parallel_cross_entropy
from .options import DEFAULT, PerfOptions, apply_options
from .rope import InterleavedMRoPE, RotaryTables, RotaryTableSelfAttention
from .specs import decoder_block_spec
from .transformer_config import Layout, build_transformer_config, deepstack_count, rope_params, text_config_of


class Qwen3OmniLanguageModel(GPTModel):
    fuse_ce_on_gpu = DEFAULT.fuse_ce_on_gpu
    # train.loss_chunk_tokens: logit rows of the LM loss at a time when a micro-batch has more (0: never chunked)
    loss_chunk_tokens = 0

    rope_tables = DEFAULT.llm_rope_tables
    fused_rope = DEFAULT.fused_rope

    def use_options(self, options: PerfOptions) -> None:
        self.fuse_ce_on_gpu = options.fuse_ce_on_gpu
        self.rope_tables = options.llm_rope_tables
        self.fused_rope = options.fused_rope

    def __init__(self, config, text_cfg: dict, transformer_layer_spec, num_deepstack: int = 0, use_te: bool = False,
                 **kw):
        kw.setdefault("scatter_embedding_sequence_parallel", False)  # we scatter after the multimodal merge
        super().__init__(
            config=config,
            transformer_layer_spec=transformer_layer_spec,
            vocab_size=text_cfg["vocab_size"],
            max_sequence_length=text_cfg.get("max_position_embeddings", 65536),
            share_embeddings_and_output_weights=bool(text_cfg.get("tie_word_embeddings", False)),
            position_embedding_type="none",
            **kw,
        )
        rp = rope_params(text_cfg)
        self.position_embedding_type = "mrope-interleaved"
        self.rotary_pos_emb = InterleavedMRoPE(
            config.kv_channels, rp["rope_theta"], rp["mrope_section"], interleaved=bool(rp["interleaved"])
        )
        self.num_deepstack = num_deepstack
        # packed rows take RoPE token by token (see attention.per_token_rope_packing); only our SDPAttention reads that
        # form. Context parallelism needs it: the positions are already this rank's, mcore's THD RoPE would cut them again
        self.per_token_rope = not use_te
        if num_deepstack and self.pre_process:
            first = get_transformer_layer_offset(config, self.vp_stage)
            assert first == 0 and len(self.decoder.layers) >= num_deepstack, (
                f"deepstack layers 0..{num_deepstack - 1} must all be on the first pipeline stage "
                f"(this stage has {len(self.decoder.layers)} layers)"
            )

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per-token loss [B, S] of logits [S, B, V/tp] (GPTModel's hook, called by its _postprocess): the same fp32
        cross-entropy as mcore's, fused on the GPU into two passes over the logits instead of a dozen
        (model.cross_entropy)."""
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous(), self.pg_collection.tp,
                                            fuse_on_gpu=self.fuse_ce_on_gpu)
        return loss.transpose(0, 1).contiguous()

    def _chunks_the_loss(self, hidden_states: torch.Tensor, labels, inference_context) -> bool:
        """The loss goes over token chunks (model.chunked_loss) when this stage makes it, a chunk size is set and the
        micro-batch has more logit rows than that; mcore's own _postprocess otherwise (inference, MTP: not ours)."""
        if labels is None or not self.post_process or not self.loss_chunk_tokens or inference_context is not None:
            return False
        if self.config.mtp_num_layers is not None:
            return False
        return labels.numel() > self.loss_chunk_tokens

    def _chunked_loss(self, hidden_states: torch.Tensor, labels: torch.Tensor, runtime_gather_output) -> torch.Tensor:
        """GPTModel._postprocess's labels path (output weight, output layer, compute_language_model_loss) one chunk of
        tokens at a time: per-token loss [B, S]."""
        output_weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None

        def logits_of(hidden_chunk):
            return self.output_layer(hidden_chunk, weight=output_weight, runtime_gather_output=runtime_gather_output)[0]

        gathered = self.pg_collection.tp.size() if self.output_layer.sequence_parallel else 1
        return chunked_lm_loss(hidden_states, labels, logits_of, self.compute_language_model_loss,
                               self.loss_chunk_tokens, gathered_ranks=gathered)

    # -- inputs ---------------------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [S, B, H] of the full sequence (not scattered), for the multimodal merge."""
        return self.embedding(input_ids=input_ids, position_ids=None)

    def _deepstack_context(self, visual_pos_masks, deepstack_visual_embeds, s, b, h, dtype, device):
        n = len(deepstack_visual_embeds)
        assert n <= len(self.decoder.layers), "more deepstack features than layers on this stage"
        mask = visual_pos_masks.to(device=device, dtype=torch.bool)  # [B, S]
        vals = torch.stack([e.to(device=device, dtype=dtype) for e in deepstack_visual_embeds], dim=1)  # [N, n, H]
        dense = torch.zeros(b, s, n, h, dtype=dtype, device=device)
        dense = dense.masked_scatter(mask[:, :, None, None].expand_as(dense), vals)  # row-major (b, s) like HF
        return dense.transpose(0, 1).contiguous()  # [S, B, n, H]

    def _layers_rotary(self, angles: torch.Tensor):
        """What the layers take as rotary_pos_emb: RotaryTables made once for all of them (PerfOptions.llm_rope_tables;
        mcore's RoPE takes cos and sin of the angles in every layer, for query and key apart), or the angles for
        mcore's RoPE: with the switch off, mcore's THD RoPE (no per-token packing), or full recompute (mcore's
        checkpoint saves the layers' arguments as tensors)."""
        layers = self.decoder.layers
        if (self.rope_tables and self.per_token_rope and self.config.recompute_granularity != "full" and len(layers)
                and isinstance(layers[0].self_attention, RotaryTableSelfAttention)):
            return RotaryTables.from_angles(angles, self.config.params_dtype, fused=self.fused_rope)
        return angles

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        decoder_input: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        packed_seq_params=None,
        visual_pos_masks: Optional[torch.Tensor] = None,
        deepstack_visual_embeds: Optional[List[torch.Tensor]] = None,
        loss_mask: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
        inference_context=None,
        return_hidden: bool = False,
    ):
        """`labels`: already shifted targets (-> per-token loss [B, S]); `padding_mask` [B, S]: True on padding, so
        the MoE routers leave pad tokens out of the load-balancing statistics (GPTModel's convention).
        `return_hidden`: also give back the final-norm hidden states [S(/tp with SP), B, H] that the output layer read
        (the talker's code predictor starts from them): `(logits or loss, hidden)`."""
        context = None
        if self.pre_process:
            if decoder_input is None:
                decoder_input = self.embed(input_ids)
            s, b, h = decoder_input.shape
            if deepstack_visual_embeds:
                assert visual_pos_masks is not None, "deepstack_visual_embeds need visual_pos_masks"
                context = self._deepstack_context(
                    visual_pos_masks, deepstack_visual_embeds, s, b, h, decoder_input.dtype, decoder_input.device
                )
                context = local_rows(context, packed_seq_params)
            decoder_input = local_rows(decoder_input, packed_seq_params)  # this CP rank's chunks (no-op without CP)
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
                if context is not None:
                    context = tensor_parallel.scatter_to_sequence_parallel_region(context)
        else:
            decoder_input = None  # the pipeline schedule set the stage input via set_input_tensor
        if padding_mask is not None and self.config.sequence_parallel:
            # every stage's MoE layers see this rank's sequence shard (GPTModel scatters it on the first stage only)
            padding_mask = tensor_parallel.scatter_to_sequence_parallel_region(
                padding_mask.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()

        if position_ids is None:
            s_full = input_ids.shape[1] if input_ids is not None else None
            assert s_full is not None, "position_ids are required on stages without input_ids"
            position_ids = torch.arange(s_full, device=input_ids.device).view(1, 1, -1).expand(3, input_ids.shape[0], -1)
        rotary_pos_emb = self.rotary_pos_emb(position_ids)
        if self.per_token_rope:
            packed_seq_params = per_token_rope_packing(packed_seq_params)

        hidden_states = self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            context=context,
            rotary_pos_emb=self._layers_rotary(rotary_pos_emb),
            packed_seq_params=packed_seq_params,
            inference_context=inference_context,
            padding_mask=padding_mask,
        )
        if self._chunks_the_loss(hidden_states, labels, inference_context):
            output = self._chunked_loss(hidden_states, labels, runtime_gather_output)
            return (output, hidden_states) if return_hidden else output
        output = self._postprocess(
            hidden_states=hidden_states,
            input_ids=input_ids,
            position_ids=position_ids,
            labels=labels,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=None,
            rotary_pos_sin=None,
            mtp_in_postprocess=False,
            loss_mask=loss_mask,
            decoder_input=decoder_input,
            attention_mask=attention_mask,
            packed_seq_params=packed_seq_params,
            runtime_gather_output=runtime_gather_output,
            inference_context=inference_context,
        )
        return (output, hidden_states) if return_hidden else output


def build_language_model(
    cfg,
    *,
    dtype: torch.dtype = torch.float32,
    use_te: Optional[bool] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    layout: Optional[Layout] = None,
    config_overrides: Optional[dict] = None,
    num_deepstack: Optional[int] = None,
    options: PerfOptions = DEFAULT,
    **config_kw,
) -> Qwen3OmniLanguageModel:
    """Build the LLM of this rank. `cfg`: HF config dict / config.json path / HF dir. The layout defaults to the one
    mcore's parallel_state was initialised with (runtime.parallel.init_parallel). `options`: the performance switches."""
    text = text_config_of(cfg)
    if layout is None:
        layout = current_layout()
    tcfg = build_transformer_config(text, layout, dtype=dtype, **config_kw, **(config_overrides or {}))
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    spec = decoder_block_spec(tcfg, text, use_te=use_te, vp_stage=vp_stage)
    model = Qwen3OmniLanguageModel(
        tcfg,
        text,
        spec,
        num_deepstack=deepstack_count(cfg) if num_deepstack is None else num_deepstack,
        use_te=bool(use_te),
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
    )
    return on_gpu_if_any(apply_options(model, options))


def on_gpu_if_any(model: torch.nn.Module) -> torch.nn.Module:
    """mcore makes some parameters on the CPU whatever the config says (the router's weight) and leaves moving the
    model to Megatron's get_model; do it here so a built model is whole on one device."""
    if torch.cuda.is_available() and not model.config.use_cpu_initialization:
        model.cuda(torch.cuda.current_device())
    return model


def current_layout() -> Layout:
    ps = parallel_state
    if not ps.model_parallel_is_initialized():
        return Layout()
    tp = ps.get_tensor_model_parallel_world_size()
    return Layout(
        tp=tp,
        pp=ps.get_pipeline_model_parallel_world_size(),
        ep=ps.get_expert_model_parallel_world_size(),
        etp=ps.get_expert_tensor_parallel_world_size(),
        cp=ps.get_context_parallel_world_size(),
        sequence_parallel=tp > 1,
    )


def count_parameters(cfg, include_embeddings: bool = True) -> dict:
    """Total and active-per-token parameter counts of the thinker LLM from its config (closed form, no model).

    active = everything except the (E - top_k) unused routed experts of every MoE layer. Embedding and output
    layer are counted in both (the output layer is a dense matmul per token; the embedding is a lookup, but the
    usual "A3B" convention counts it). Use `count_model_parameters` to count an instantiated (meta) model.
    """
    t = text_config_of(cfg)
    h, v = t["hidden_size"], t["vocab_size"]
    hd = t.get("head_dim") or h // t["num_attention_heads"]
    nh, ng = t["num_attention_heads"], t.get("num_key_value_heads", t["num_attention_heads"])
    attn = h * (nh + 2 * ng) * hd + nh * hd * h + 2 * hd + 2 * h  # qkv, proj, q/k norm, 2 layer norms
    from .specs import moe_layer_pattern

    total = active = 0
    for is_moe in moe_layer_pattern(t):
        if is_moe:
            e, k, f = t["num_experts"], t["num_experts_per_tok"], t["moe_intermediate_size"]
            per_expert = 3 * h * f
            total += attn + e * h + e * per_expert
            active += attn + e * h + k * per_expert
        else:
            dense = 3 * h * t["intermediate_size"]
            total += attn + dense
            active += attn + dense
    tail = h + (v * h if include_embeddings else 0) + (0 if t.get("tie_word_embeddings") else v * h)
    return {"total": total + tail, "active": active + tail}


def count_model_parameters(model: torch.nn.Module, text_cfg: dict) -> dict:
    """Total and active-per-token counts of an instantiated (e.g. meta-device, single-rank) model."""
    t = text_config_of(text_cfg)
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    e, k = t.get("num_experts", 0) or 0, t.get("num_experts_per_tok", 0) or 0
    active = total - (expert * (e - k) // e if e else 0)
    return {"total": total, "active": active}
