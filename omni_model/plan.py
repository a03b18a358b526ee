"""Per-GPU memory planner: will this layout fit, and which layouts would?

    python -m omni_model.plan --config config/qwen3-omni-30b-a3b-16gpu-h20.yaml     # table for the config's run

For a thinker config (HF `config.json` dict), a layout (TP/PP/EP/ETP/DP, distributed optimizer) and a workload
(micro-batch x seq_len, recompute, freeze switches) it estimates the peak memory of the busiest rank, part by part:

    weights      every parameter of the rank in the training dtype (bf16 on GPU, frozen ones too; LoRA adapters)
    grads        fp32 main grads of the trainable parameters (mcore DDP buffers, grad_reduce_in_fp32); with
                 train.lora the adapters only (and below: their optimizer state only)
    optimizer    fp32 master copy + 2 Adam moments of the trainable parameters (12 B each), divided over the
                 data-parallel ranks by the distributed optimizer (dense params over DP, experts over expert-DP);
                 CPU/fp32: the 2 moments only (mcore's FP32Optimizer has no master copy)
    activations  what autograd keeps for backward, per token and layer (attention + MoE with its top-k dispatched
                 rows), divided by TP / SP and by CP (each CP rank keeps 1/cp of every packed row, plus the K/V of
                 the whole row that its attention gathers); times the micro-batches in flight on the first stage
    recompute    full recompute: one layer's activations, rebuilt during its backward
    towers       the vision / audio encoders' activations when they train (frozen towers keep none); not divided
                 by CP: every CP rank runs the towers on the whole micro-batch (model.context_parallel says why)
    logits       the fp32 softmax of the [tokens x vocab/TP] logits kept by the cross entropy + the transient bf16
                 logits and fp32 gradient around it (vocab 152064: the largest single tensors of a step); with
                 train.loss_chunk_tokens below a rank's tokens, one chunk of them (model.chunked_loss)
    overhead     CUDA context, NCCL buffers, allocator fragmentation (only in `total`, not in `allocated`)

`allocated` is what `torch.cuda.max_memory_allocated` measures (bench/planner_check.py compares the two); `total`
adds the overhead and is what `train.gpu_memory_gib` is checked against. Parameter counts per rank are exact
(tests/test_plan.py compares them with models built at those layouts); activations are a model of what this code
keeps (SDPA/flash attention: no s^2 matrix; grouped-GEMM experts), checked on an H200 by bench/planner_check.py.
The finetune rule calls `check_run` before any rank starts; `snakemake plan` writes the table to results/plan.txt.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional

from omni_model.configs import moe_layer_pattern, thinker_config_of
from omni_model.data.media import conv_out_length
from omni_model.layout import Layout, LayoutError

GIB = 1024 ** 3
# CUDA context + NCCL communicators and buffers per rank (not seen by torch's allocator), and the allocator's
# fragmentation on top of what tensors hold: what `total` adds to `allocated`.
CUDA_OVERHEAD_GIB = 3.0
FRAGMENTATION = 0.05


class PlanError(ValueError):
    """The layout does not fit; the message lists layouts that do."""


# --------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Workload:
    micro_batch_size: int = 1
    seq_len: int = 2048
    recompute: str = "none"  # none | selective | full (train.recompute)
    freeze_llm: bool = False
    freeze_vision: bool = False
    freeze_audio: bool = False
    num_microbatches: int = 1  # per step and DP rank (global / (micro x dp)): caps the 1F1B micro-batches in flight
    # media tokens of one micro-batch; None = the worst case, the whole micro-batch is one kind of media
    image_tokens: Optional[int] = None
    audio_tokens: Optional[int] = None
    bf16: bool = True  # GPU: bf16 params + mcore's mixed-precision optimizer; False: fp32 (the CPU path)
    lora_rank: int = 0  # train.lora: adapter rank (0 = full fine-tuning)
    lora_targets: tuple = ()  # train.lora.targets
    loss_chunk_tokens: int = 0  # train.loss_chunk_tokens: logit rows of the loss at a time (0 = all of them)

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_len


# --------------------------------------------------------------------------------------------------- parameters
def _configs(hf_config: dict) -> tuple[dict, dict, dict]:
    thinker = thinker_config_of(hf_config)
    return thinker["text_config"], thinker.get("vision_config"), thinker.get("audio_config")


def _encoder_layer(d: int, f: int, tp: int) -> int:
    """One pre-LN encoder layer (LayerNorm with bias, biased column qkv/fc1, row proj/fc2) on one TP rank."""
    return 2 * d + (3 * d * d + 3 * d) // tp + d * d // tp + d + 2 * d + (d * f + f) // tp + f * d // tp + d


def vision_params(vision: dict, tp: int) -> int:
    d, f = vision["hidden_size"], vision["intermediate_size"]
    patch = d * vision.get("in_channels", 3) * vision["temporal_patch_size"] * vision["patch_size"] ** 2 + d
    merged = d * vision["spatial_merge_size"] ** 2
    out = vision["out_hidden_size"]
    merger_fc = (merged * merged + merged) // tp + merged * out // tp + out
    deepstack = len(vision.get("deepstack_visual_indexes") or ())
    return (patch + vision["num_position_embeddings"] * d + vision["depth"] * _encoder_layer(d, f, tp)
            + (2 * d + merger_fc) + deepstack * (2 * merged + merger_fc))


def audio_tp(audio: dict, tp: int) -> int:
    """The audio tower's TP size: the model's, unless TP does not divide heads and FFN (then a full copy per rank;
    the rule of omni_model.model.audio.audio_replicated)."""
    split = audio["encoder_attention_heads"] % tp == 0 and audio["encoder_ffn_dim"] % tp == 0
    return tp if split else 1


def audio_params(audio: dict, tp: int) -> int:
    d, f, ds = audio["d_model"], audio["encoder_ffn_dim"], audio["downsample_hidden_size"]
    freq = conv_out_length(audio["num_mel_bins"], 3)
    convs = (ds * 9 + ds) + 2 * (ds * ds * 9 + ds)
    layers = audio["encoder_layers"] * _encoder_layer(d, f, audio_tp(audio, tp))
    return convs + ds * freq * d + layers + 2 * d + (d * d + d) + (d * audio["output_dim"] + audio["output_dim"])


def stage_layers(num_layers: int, layout: Layout) -> list[int]:
    """Decoder layers per pipeline stage (the layout's split: parallel.first_stage_layers, else even)."""
    try:
        return layout.stage_layers(num_layers)
    except LayoutError as error:
        raise PlanError(str(error)) from None


@dataclass
class StageParams:
    """Parameter counts of one rank of a pipeline stage, by how they are sharded and trained."""
    llm_dense: int = 0  # attention, norms, router, embedding/output on their stages (DP-sharded by the dist. optimizer)
    llm_expert: int = 0  # routed experts (expert-DP-sharded)
    vision: int = 0
    audio: int = 0

    @property
    def total(self) -> int:
        return self.llm_dense + self.llm_expert + self.vision + self.audio


def stage_params(hf_config: dict, layout: Layout, stage: int = 0) -> StageParams:
    """Exact parameter counts of one rank of pipeline stage `stage` (tests/test_plan.py checks them against built
    models)."""
    text, vision, audio = _configs(hf_config)
    tp, ep, etp = layout.tp, layout.ep, layout.etp
    h, v = text["hidden_size"], text["vocab_size"]
    nh = text["num_attention_heads"]
    ng = text.get("num_key_value_heads", nh)
    hd = text.get("head_dim") or h // nh
    attn = h * (nh + 2 * ng) * hd // tp + nh * hd * h // tp + 2 * hd + 2 * h
    pattern = moe_layer_pattern(text)
    per_stage = stage_layers(len(pattern), layout)
    first = sum(per_stage[:stage])
    out = StageParams()
    for is_moe in pattern[first:first + per_stage[stage]]:
        out.llm_dense += attn
        if is_moe:
            e, f = text["num_experts"], text["moe_intermediate_size"]
            out.llm_dense += e * h  # router (replicated over TP)
            out.llm_expert += (e // ep) * 3 * h * f // etp
        else:
            out.llm_dense += 3 * h * text["intermediate_size"] // tp
    tied = bool(text.get("tie_word_embeddings", False))
    if stage == 0:
        out.llm_dense += v // tp * h
        out.vision = vision_params(vision, tp) if vision else 0
        out.audio = audio_params(audio, tp) if audio else 0
    if stage == layout.pp - 1:
        out.llm_dense += h + (0 if tied and layout.pp == 1 else v // tp * h)
    return out


# --------------------------------------------------------------------------------------------------- activations
def norm_saved_bytes(width: int, a: int) -> int:
    """Per position, what our RMSNorm (omni_model.model.norm) leaves for backward: the fp32 copy of its input (the
    input itself when it already is fp32), the normalized tensor and the output (the next layer's saved input)."""
    return (4 + 2 * a) * width


def llm_layer_activation_bytes(text: dict, layout: Layout, work: Workload, is_moe: bool) -> int:
    """Bytes autograd keeps for one decoder layer and micro-batch with no recompute (this code's local spec; the
    terms are the tensors counted with saved-tensor hooks on the real forward, bench/planner_check.py --cpu).

    Attention, per token: the RMSNorm (SP: this rank's shard of the tokens); the qkv output storage, the q/k-norm
    fp32 copies (bf16 runs) and outputs, q/k after RoPE, SDPA output and proj input (flash/efficient SDPA: no s x s
    matrix); fp32 RoPE cos/sin and log-sum-exp. MoE: the RMSNorm, the router's fp32 input copy (bf16 runs) and fp32
    logits/probs/top-k, and per dispatched row (top-k rows per token on the rank of its expert): fc1 input, fc1
    output (SwiGLU input), silu output and the prob-scaled fc2 input (h + 4 f).
    """
    a = 2 if work.bf16 else 4
    upcast = 4 if work.bf16 else 0  # x.float() of a bf16 tensor is a new fp32 tensor; of an fp32 one, itself
    tp, etp = layout.tp, layout.etp
    h = text["hidden_size"]
    nh = text["num_attention_heads"]
    ng = text.get("num_key_value_heads", nh)
    hd = text.get("head_dim") or h // nh
    tokens = cp_tokens(work, layout)
    local = tokens // tp  # SP shard (tp > 1 forces SP for MoE)
    heads = tokens // tp  # tokens x this rank's heads
    per_head_token = a * (nh + 2 * ng) * hd + upcast * (nh + ng) * hd + a * (2 * (nh + ng) * hd + 2 * nh * hd)
    if work.recompute == "selective":  # mcore's default module list: core attention (SDPA's own q/k/v layouts)
        per_head_token -= a * (nh + 2 * ng) * hd
    attn = local * norm_saved_bytes(h, a) + heads * per_head_token + 4 * tokens * 4 * hd + 4 * heads * nh
    attn += cp_gathered_kv_bytes(text, layout, work)
    if is_moe:
        e, k, f = text["num_experts"], text["num_experts_per_tok"], text["moe_intermediate_size"]
        rows = k * local * etp  # top-k copies of this rank's tokens; ETP ranks see each other's tokens
        mlp = local * (norm_saved_bytes(h, a) + upcast * h + 4 * e * 3) + rows * (a * (h + 4 * f // etp) + 20)
    else:
        f = text["intermediate_size"]
        mlp = local * norm_saved_bytes(h, a) + heads * a * 4 * f
    return attn + mlp


def cp_tokens(work: Workload, layout: Layout) -> int:
    """Tokens of one micro-batch on one CP rank: 1/cp of the packed row (the zig-zag split; the padding of each
    sequence to 2 x cp chunks is at most 2 x cp - 1 tokens a sequence, left out)."""
    return -(-work.tokens // layout.cp)


def logit_rows(work: Workload, layout: Layout) -> int:
    """Rows of the logits that exist at once on a rank of the last stage: its tokens (the output layer all-gathers an
    SP input, so not divided by TP), or one chunk of train.loss_chunk_tokens when it has more (model.chunked_loss)."""
    rows = cp_tokens(work, layout)
    return min(rows, work.loss_chunk_tokens) if work.loss_chunk_tokens else rows


def cp_gathered_kv_bytes(text: dict, layout: Layout, work: Workload) -> int:
    """What a CP rank's attention keeps of the K/V gathered from all CP ranks (model.context_parallel): each of its
    query chunks' causal key prefix, (1 + 1/(2 cp)) x the row's tokens, K and V, this rank's TP share of the KV
    heads. None without CP."""
    if layout.cp == 1:
        return 0
    a = 2 if work.bf16 else 4
    nh = text["num_attention_heads"]
    ng = text.get("num_key_value_heads", nh)
    hd = text.get("head_dim") or text["hidden_size"] // nh
    laid_out = work.tokens + -(-work.tokens // (2 * layout.cp))
    return a * laid_out * 2 * max(ng // layout.tp, 1) * hd


def llm_outer_activation_bytes(text: dict, layout: Layout, work: Workload, deepstack: int) -> int:
    """Outside the layers, per micro-batch: the final RMSNorm (its output is the output layer's input); with full
    recompute the checkpointed layers also keep the deepstack context (one hidden-size tensor per feature)."""
    a = 2 if work.bf16 else 4
    local = cp_tokens(work, layout) // layout.tp
    outer = local * norm_saved_bytes(text["hidden_size"], a)
    if work.recompute == "full":
        outer += a * deepstack * local * text["hidden_size"]
    return outer


def _encoder_activation_values(d: int, f: int, tp: int) -> int:
    """Values kept per position of one encoder layer: 4 hidden-size tensors (the LayerNorms' inputs and outputs,
    whole on every TP rank: no SP in the towers), the qkv storage + q/k after RoPE + SDPA output (6 d, TP-split),
    fc1 output (GELU input) and fc2 input (2 f, TP-split)."""
    return 4 * d + (6 * d + 2 * f) // tp


def tower_activation_bytes(hf_config: dict, layout: Layout, work: Workload) -> dict:
    """Activation bytes of the towers that train, for one micro-batch (worst case: all of it is that media)."""
    _, vision, audio = _configs(hf_config)
    a = 2 if work.bf16 else 4
    full = work.recompute == "full"
    out = {"vision": 0, "audio": 0}
    if vision and not work.freeze_vision:
        d, f, merge = vision["hidden_size"], vision["intermediate_size"], vision["spatial_merge_size"]
        image_tokens = work.image_tokens if work.image_tokens is not None else work.tokens
        patches = image_tokens * merge ** 2
        patch_dim = vision.get("in_channels", 3) * vision["temporal_patch_size"] * vision["patch_size"] ** 2
        hd = d // vision["num_heads"]
        # per layer: its input under full recompute, else the layer's tensors + fp32 2D-RoPE cos/sin
        per_layer = a * d if full else a * _encoder_activation_values(d, f, layout.tp) + 4 * 4 * hd
        merged = d * merge ** 2
        deepstack = len(vision.get("deepstack_visual_indexes") or ())
        # mergers per image token: LN output, fc1 output, fc2 input (+ the deepstack LNs' grouped inputs)
        mergers = (1 + deepstack) * 3 * merged // layout.tp + deepstack * merged
        out["vision"] = patches * (vision["depth"] * per_layer + a * patch_dim) + a * image_tokens * mergers
    if audio and not work.freeze_audio:
        d, f, ds = audio["d_model"], audio["encoder_ffn_dim"], audio["downsample_hidden_size"]
        positions = work.audio_tokens if work.audio_tokens is not None else work.tokens
        per_layer = d if full else _encoder_activation_values(d, f, audio_tp(audio, layout.tp))
        mel = audio["num_mel_bins"]
        convs = ds * (mel // 2 * 4 * 2 + mel // 4 * 2 * 2 + mel // 8 * 2)  # conv outputs + GELU inputs per position
        out["audio"] = a * positions * (audio["encoder_layers"] * per_layer + convs + 4 * d)
    if work.image_tokens is None and work.audio_tokens is None:  # one sequence is not all image AND all audio
        worst = max(out, key=out.get)
        out = {k: (val if k == worst else 0) for k, val in out.items()}
    return out


# --------------------------------------------------------------------------------------------------- estimate
@dataclass
class Estimate:
    layout: Layout
    stage: int
    work: Workload
    params: StageParams
    trainable: int
    parts: dict = field(default_factory=dict)  # bytes per part

    def describe(self) -> str:
        return (self.layout.describe() + (f" stage {self.stage}" if self.layout.pp > 1 else "")
                + (f" recompute {self.work.recompute}" if self.work.recompute != "none" else ""))

    @property
    def allocated(self) -> int:
        return sum(self.parts.values())

    @property
    def total(self) -> int:
        """allocated + fragmentation + the CUDA context / NCCL buffers (GPU runs only)."""
        cuda = CUDA_OVERHEAD_GIB * GIB if self.work.bf16 else 0
        return int(self.allocated * (1 + FRAGMENTATION) + cuda)

    def row(self) -> dict:
        return {"layout": self.describe(), "stage": self.stage, "params": self.params.total,
                "trainable": self.trainable, **{k: round(b / GIB, 2) for k, b in self.parts.items()},
                "allocated_gib": round(self.allocated / GIB, 2), "total_gib": round(self.total / GIB, 2)}


def lora_params(hf_config: dict, layout: Layout, work: Workload, stage: int = 0) -> tuple[int, int]:
    """(dense, expert) adapter parameters of one rank of stage `stage` (omni_model.model.lora's shapes: column
    linears A whole + B split over TP, row linears A split + B whole; experts' A/B per local expert, split over ETP
    like their weights). Tower linears are counted whole on every rank (an upper bound under TP)."""
    text, vision, audio = _configs(hf_config)
    r, targets, tp = work.lora_rank, set(work.lora_targets), layout.tp
    h, nh = text["hidden_size"], text["num_attention_heads"]
    ng, hd = text.get("num_key_value_heads", nh), text.get("head_dim") or h // nh
    pattern = moe_layer_pattern(text)
    per_stage = stage_layers(len(pattern), layout)
    first = sum(per_stage[:stage])
    dense = expert = 0
    for is_moe in pattern[first:first + per_stage[stage]]:
        if "attention" in targets:  # q, k, v (an A each) + o_proj
            dense += r * (3 * h + (nh + 2 * ng) * hd // tp) + r * (nh * hd // tp + h)
        if is_moe and "experts" in targets:
            f = text["moe_intermediate_size"]
            expert += text["num_experts"] // layout.ep * r * (2 * h + 3 * f // layout.etp)
        elif not is_moe and "dense_mlp" in targets:
            f = text["intermediate_size"]
            dense += r * (2 * h + 2 * f // tp) + r * (f // tp + h)
    if stage == 0:
        for tower, cfg, d_key, f_key, n_key in (("vision", vision, "hidden_size", "intermediate_size", "depth"),
                                                 ("audio", audio, "d_model", "encoder_ffn_dim", "encoder_layers")):
            if cfg and tower in targets:  # qkv (3 A's at most), proj, fc1, fc2 per layer
                d, f = cfg[d_key], cfg[f_key]
                dense += cfg[n_key] * r * ((3 * d + 3 * d) + 2 * d + (d + f) + (f + d))
    return dense, expert


def trainable_params(params: StageParams, work: Workload, lora: Optional[tuple] = None) -> tuple[int, int]:
    """(dense, expert) trainable counts of a rank under the freeze switches; with LoRA (`lora` = lora_params) the
    adapters only."""
    if work.lora_rank:
        return lora
    dense = (0 if work.freeze_llm else params.llm_dense) + (0 if work.freeze_vision else params.vision) \
        + (0 if work.freeze_audio else params.audio)
    return dense, (0 if work.freeze_llm else params.llm_expert)


def optimizer_bytes(params: StageParams, layout: Layout, work: Workload, adapters: tuple = (0, 0)) -> int:
    """Adam state of one rank: fp32 master + exp_avg + exp_avg_sq (bf16 run) or the two moments (fp32 run); the
    distributed optimizer keeps 1/DP of the dense and 1/expert-DP of the expert parameters' state. With LoRA
    (`adapters` = lora_params) of the adapters only."""
    dense, expert = trainable_params(params, work, adapters)
    per_param = 12 if work.bf16 else 8
    if layout.distributed_optimizer:
        return per_param * (math.ceil(dense / layout.dp) + math.ceil(expert / layout.expert_dp))
    return per_param * (dense + expert)


def estimate_stage(hf_config: dict, layout: Layout, work: Workload, stage: int) -> Estimate:
    text, _, _ = _configs(hf_config)
    params = stage_params(hf_config, layout, stage)
    adapters = lora_params(hf_config, layout, work, stage) if work.lora_rank else (0, 0)
    dense, expert = trainable_params(params, work, adapters)
    w = 2 if work.bf16 else 4
    pattern = moe_layer_pattern(text)
    per_stage = stage_layers(len(pattern), layout)
    first = sum(per_stage[:stage])
    layers = pattern[first:first + per_stage[stage]]
    in_flight = min(layout.pp - stage, work.num_microbatches)  # 1F1B: stage s holds pp - s micro-batches
    a = 2 if work.bf16 else 4
    deepstack = len((_configs(hf_config)[1] or {}).get("deepstack_visual_indexes") or ()) if stage == 0 else 0
    recompute = 0
    if work.freeze_llm:
        act = 0
    elif work.recompute == "full":  # each layer keeps its input; backward recomputes one layer at a time
        act = in_flight * (len(layers) * a * cp_tokens(work, layout) // layout.tp * text["hidden_size"]
                           + llm_outer_activation_bytes(text, layout, work, deepstack))
        recompute = max(llm_layer_activation_bytes(text, layout, replace(work, recompute="none"), m) for m in layers)
    else:
        act = in_flight * (sum(llm_layer_activation_bytes(text, layout, work, m) for m in layers)
                           + llm_outer_activation_bytes(text, layout, work, deepstack))
    # LoRA: the frozen base held once in the training dtype, beside the adapters; grads and optimizer state are the
    # adapters' only. The activations are full SFT's: the adapted linears keep the same inputs (for A's gradient)
    # and every layer above an adapter still needs its input gradient.
    parts = {"weights": w * (params.total + sum(adapters)), "grads": 4 * (dense + expert),
             "optimizer": optimizer_bytes(params, layout, work, adapters), "activations": act, "recompute": recompute}
    if stage == 0:
        towers = tower_activation_bytes(hf_config, layout, work)
        parts["towers"] = in_flight * sum(towers.values())
    if stage == layout.pp - 1:
        v = text["vocab_size"] // layout.tp
        # fp32 softmax kept by the vocab-parallel cross entropy, plus the transient logits (training dtype) and their
        # fp32 copy / gradient at the forward-backward turn of the last micro-batch
        parts["logits"] = logit_rows(work, layout) * v * (4 + a + 4)
    return Estimate(layout=layout, stage=stage, work=work, params=params, trainable=dense + expert, parts=parts)


def estimate(hf_config: dict, layout: Layout, work: Workload) -> Estimate:
    """The busiest rank: the stage with the largest total."""
    return max((estimate_stage(hf_config, layout, work, s) for s in range(layout.pp)), key=lambda e: e.allocated)


# --------------------------------------------------------------------------------------------------- search
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(hf_config: dict, world_size: int, gpus_per_node: int, distributed_optimizer: bool = True
                      ) -> Iterator[Layout]:
    """Layouts mcore (and this model) can build on `world_size` ranks: TP within a node and dividing the heads,
    PP with the deepstack layers on stage 0 (mcore's even split, else the smallest parallel.first_stage_layers that
    holds them), EP dividing the experts and DP x TP."""
    text, vision, _ = _configs(hf_config)
    heads, groups = text["num_attention_heads"], text.get("num_key_value_heads", text["num_attention_heads"])
    experts = text.get("num_experts") or 1
    deepstack = len((vision or {}).get("deepstack_visual_indexes") or ())
    layers = text["num_hidden_layers"]
    for tp in _divisors(world_size):
        if tp > max(gpus_per_node, 1) or heads % tp or groups % tp:
            continue
        for pp in _divisors(world_size // tp):
            first = _first_stage_layers(layers, pp, deepstack)
            if first == 0:
                continue
            dp = world_size // (tp * pp)
            for ep in _divisors(experts):
                for etp in (1, tp) if tp > 1 else (1,):
                    if (dp * tp) % (ep * etp):
                        continue
                    yield Layout(tp=tp, pp=pp, ep=ep, etp=etp, dp=dp, distributed_optimizer=distributed_optimizer,
                                 first_stage_layers=first)


def _first_stage_layers(layers: int, pp: int, deepstack: int) -> Optional[int]:
    """parallel.first_stage_layers for `pp` stages: None when mcore's even split holds the deepstack layers on stage
    0, else the smallest uneven split that does; 0 when none does."""
    if pp == 1 or (layers % pp == 0 and layers // pp >= deepstack):
        return None
    choices = Layout(pp=pp).first_stage_choices(layers, deepstack)
    return choices[0] if choices else 0


def fitting_layouts(hf_config: dict, world_size: int, gpus_per_node: int, work: Workload, gpu_memory_gib: float,
                    limit: int = 8) -> list[Estimate]:
    """Layouts (with the configured recompute, else full recompute) whose total fits `gpu_memory_gib`."""
    works = [work] if work.recompute == "full" else [work, replace(work, recompute="full")]
    fits = [e for w in works for e in (estimate(hf_config, layout, w)
                                       for layout in candidate_layouts(hf_config, world_size, gpus_per_node))
            if e.total <= gpu_memory_gib * GIB]
    # configured recompute first, then the least model parallelism, then the most headroom
    fits.sort(key=lambda e: (e.work.recompute != work.recompute, e.layout.tp * e.layout.pp * e.layout.etp,
                             e.layout.pp, e.total))
    return fits[:limit]


# --------------------------------------------------------------------------------------------------- from a run
def workload_of(train, dp: int, on_gpu: bool) -> Workload:
    """The workload of a train section (TrainConfig or mapping)."""
    from omni_model.schema import TrainConfig
    from omni_model.train.settings import LoraSpec

    train = TrainConfig.of(train)
    lora = LoraSpec.of(train.lora)
    frozen = {part: bool(getattr(train, f"freeze_{part}")) for part in ("llm", "vision", "audio")}
    if lora:  # a tower without adapters keeps no activations; the LLM always carries some (attention/experts)
        frozen = {"llm": not set(lora.targets) & {"attention", "experts", "dense_mlp"},
                  "vision": "vision" not in lora.targets, "audio": "audio" not in lora.targets}
    return Workload(
        micro_batch_size=int(train.micro_batch_size), seq_len=int(train.seq_len),
        recompute=train.recompute, freeze_llm=frozen["llm"], freeze_vision=frozen["vision"],
        freeze_audio=frozen["audio"],
        num_microbatches=max(1, int(train.global_batch_size) // (int(train.micro_batch_size) * dp)),
        bf16=on_gpu, lora_rank=lora.rank if lora else 0, lora_targets=tuple(lora.targets) if lora else (),
        loss_chunk_tokens=int(train.loss_chunk_tokens))


def layout_of(parallel: dict, world_size: int, on_gpu: bool) -> Layout:
    try:
        return Layout.of(parallel, world_size, distributed_optimizer=on_gpu)
    except LayoutError as error:
        raise PlanError(str(error)) from None


def table(estimates: list[Estimate]) -> str:
    cols = ["layout", "weights", "grads", "optimizer", "activations", "recompute", "towers", "logits", "allocated",
            "total"]
    width = max([32] + [len(e.describe()) for e in estimates])
    lines = [" | ".join(f"{c:>11}" if i else f"{c:<{width}}" for i, c in enumerate(cols))]
    for e in estimates:
        vals = [e.parts.get(c, 0) / GIB for c in cols[1:-2]] + [e.allocated / GIB, e.total / GIB]
        lines.append(" | ".join([f"{e.describe():<{width}}"]
                                + [f"{v:>7.1f} GiB" for v in vals]))
    return "\n".join(lines)


def check_run(hf_config: dict, train, parallel, world_size: int, on_gpu: bool) -> Estimate:
    """Estimate the configured run; raise PlanError (with the layouts that fit on the same GPUs) when its total is
    above train.gpu_memory_gib. gpu_memory_gib null: estimate only. A run that cannot train at all (the training
    checks of omni_model.train.settings, e.g. a pipeline split or a model too small for its deepstack layers) is
    refused with the same message the workflow gives."""
    from omni_model.train.settings import SettingsError, check_config, typed_sections

    try:
        train, parallel, _ = typed_sections(train, parallel)
        check_config(train, parallel, world_size, hf_config)
    except SettingsError as error:
        raise PlanError(str(error)) from None
    layout = layout_of(parallel.as_dict(), world_size, on_gpu)
    work = workload_of(train, layout.dp, on_gpu)
    est = estimate(hf_config, layout, work)
    limit = train.gpu_memory_gib
    if limit is not None and est.total > float(limit) * GIB:
        fits = fitting_layouts(hf_config, world_size, int(train.gpus_per_node or 1), work, float(limit))
        fits_text = table(fits) if fits else "  none, also with recompute full: more GPUs, or freeze the towers / LLM"
        raise PlanError(
            f"parallel {layout.describe()} needs ~{est.total / GIB:.1f} GiB per GPU (allocated "
            f"{est.allocated / GIB:.1f} + CUDA/NCCL overhead), above train.gpu_memory_gib = {limit} "
            f"(micro_batch_size {work.micro_batch_size} x seq_len {work.seq_len}, recompute {work.recompute}).\n"
            f"{table([est])}\nLayouts that fit {world_size} GPUs of {limit} GiB:\n{fits_text}")
    return est


def check_settings(settings) -> Estimate:
    """The finetune rule's check before launching: the run of a TrainSettings (model config from its hf_dir)."""
    hf_config = json.loads((Path(settings.hf_dir) / "config.json").read_text())
    est = check_run(hf_config, settings.train, settings.parallel, settings.world_size, settings.on_gpu)
    limit = settings.train.gpu_memory_gib
    print(f"[plan] {est.layout.describe()}: ~{est.total / GIB:.1f} GiB per rank (allocated {est.allocated / GIB:.1f})"
          + (f" of {limit} GiB" if limit is not None else ""), flush=True)
    return est


# --------------------------------------------------------------------------------------------------- config files
def model_config_of(config: dict, root: Path = Path(".")) -> dict:
    """The HF config.json dict the pipeline config trains: tiny / random from their definitions, local from its
    folder, hub sources from the downloaded folder (or the released 30B-A3B values for its repository ids)."""
    from omni_model.configs import released_30b_a3b_config, tiny_config

    model = config["model"]
    source = model.get("source", "tiny")
    downloaded = root / "results" / "model" / "hf" / "config.json"
    if source == "tiny":
        return tiny_config()
    if source == "random":
        from omni_model.random_checkpoint import resolve_config

        return resolve_config(model.get("config", "released-30b-a3b"), model.get("overrides") or {})
    if source == "local":
        return json.loads((Path(model["path"]) / "config.json").read_text())
    # the released repository's values first: results/model/hf may hold the model of another config (e.g. the demo's)
    if "qwen3-omni-30b-a3b" in str(model.get("id", "")).lower():
        return released_30b_a3b_config()
    if downloaded.is_file():
        return json.loads(downloaded.read_text())
    raise PlanError(f"model.id {model.get('id')!r}: its config.json is not downloaded yet "
                    f"({downloaded}); run `snakemake download` first")


def known_model_config(config: dict, root: Path = Path(".")) -> Optional[dict]:
    """model_config_of when the model's config is known before any job runs (tiny, random, local, the released
    30B-A3B ids, a downloaded hub model), else None."""
    try:
        return model_config_of(config, root)
    except (PlanError, OSError):
        return None


def load_pipeline_config(paths: list[str], root: Path = Path(".")) -> dict:
    """config/config.yaml, then each --configfile merged over it (as Snakemake does), schema defaults filled."""
    import yaml

    from omni_model.config import coerce, fill_defaults
    from omni_model.random_checkpoint import merge

    config = yaml.safe_load((root / "config" / "config.yaml").read_text())
    for path in paths:
        config = merge(config, yaml.safe_load(Path(path).read_text()))
    schema = yaml.safe_load((root / "config" / "schema.yaml").read_text())
    return fill_defaults(coerce(config, schema), schema)


def world_size_of(train) -> int:
    """Ranks of a train section (TrainConfig or mapping): GPUs or CPU processes per node x nodes."""
    from omni_model.schema import TrainConfig

    train = TrainConfig.of(train)
    per_node = train.gpus_per_node if train.gpus_per_node > 0 else train.cpu_procs
    return per_node * train.nnodes


# ------------------------------------------------------------------------------------- plan-time checks of finetune
def local_gpu_problem(gpus_per_node: int) -> str | None:
    """train.gpus_per_node against the GPUs torch can use on this machine (for a finetune job that runs here)."""
    if gpus_per_node <= 0:
        return None
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found >= gpus_per_node:
        return None
    build = "a CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
    return (f"train.gpus_per_node = {gpus_per_node}, but this torch {torch.__version__} ({build}) can use {found} "
            f"GPU(s) here, and finetune would run on this machine: install a CUDA build of torch (README.md, 'GPU "
            f"set-up'), set train.gpus_per_node: 0 to train on the CPU, or submit to GPU nodes (--profile slurm)")


def finetune_problems(config: dict, runs_here: bool, root: Path = Path(".")) -> list[str]:
    """What stops the finetune job, known before any job runs: the memory planner's refusal (and the training checks
    it starts with) when the model's config is known (tiny, random, local, the released ids, a downloaded model),
    and, when the job runs on this machine, GPUs that torch cannot use."""
    from omni_model.schema import TrainConfig

    train = TrainConfig.of(config["train"])
    gpu_problem = local_gpu_problem(train.gpus_per_node) if runs_here else None
    problems = [gpu_problem] if gpu_problem else []
    hf_config = known_model_config(config, root)
    if hf_config is not None:
        try:
            check_run(hf_config, train, config["parallel"], world_size_of(train), on_gpu=train.gpus_per_node > 0)
        except PlanError as error:
            problems.append(str(error))
    return problems


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omni_model.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", default=[], help="pipeline config(s), merged over "
                        "config/config.yaml like --configfile")
    parser.add_argument("--json", help="also write the estimate as JSON here")
    args = parser.parse_args(argv)
    from omni_model.schema import TrainConfig

    config = load_pipeline_config(args.config)
    train, parallel = TrainConfig.of(config["train"]), config["parallel"]
    on_gpu = train.gpus_per_node > 0
    world = world_size_of(train)
    hf_config = model_config_of(config)
    limit = train.gpu_memory_gib
    try:
        est = check_run(hf_config, train, parallel, world, on_gpu)
    except PlanError as error:
        print(f"REFUSED: {error}")
        return 1
    print(f"{world} rank(s), micro-batch {train.micro_batch_size} x seq {train.seq_len}, recompute "
          f"{train.recompute}, freeze llm/vision/audio {train.freeze_llm}/{train.freeze_vision}/"
          f"{train.freeze_audio}, {'bf16' if on_gpu else 'fp32 (CPU)'}; gpu_memory_gib {limit}")
    print(table([est]))
    if limit is not None:
        print(f"fits: {est.total / GIB:.1f} of {limit} GiB")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**est.row(), "gpu_memory_gib": limit, "layout_fields": asdict(
            est.layout)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
