"""LoRA adapters around the thinker's Megatron-Core linears and grouped experts (`train.lora`).

    inject_lora(thinker, LoraSpec(rank=16, alpha=32, targets=("attention", "experts")), seed=1234)

Each targeted linear is replaced by a wrapper that keeps the frozen base module (`.base`, its state-dict names
unchanged in `sharded_state_dict`) and adds `scaling * B(A(dropout(x)))` to its output. The adapters follow the
layout of the weight they adapt, so they need no communication of their own beyond a rank-r activation:

- column-parallel (linear_qkv, fc1): A replicated [r, in], B split by rows [out/tp, r]. h = A x is complete on every
  TP rank; its gradient is a partial sum over the ranks' B shards, summed by `copy_to_tensor_model_parallel_region`.
  Under sequence parallelism the input is gathered like the base layer's, with a split (not a reduce-scatter) as the
  backward, because the gradient reaching it is already complete.
- row-parallel (linear_proj, fc2): A split by columns [r, in/tp], B replicated [out, r]. h = A x is a partial sum,
  all-reduced forward (rank r: tiny); under SP the delta is split over the sequence like the base's reduce-scatter.
- grouped experts: A [E, r, in], B [E, out, r] for the E local experts, one grouped GEMM each for all of them.
  fc1 holds A whole and B's rows split over ETP, fc2 A's columns split and B whole; the token dispatcher sums the
  ETP ranks' partial outputs and input gradients, as for the base weights, so the one missing reduction is of the
  replicated factor's gradient (fc1's A, fc2's B), done by `_sum_grad_over` in the backward.

The adapters match PEFT's LoRA on transformers' Qwen3-Omni so that a PEFT folder can be exported (and is tested):
attention q/k/v are three LoRAs (q_proj, k_proj, v_proj: separate A's; the vision tower's fused qkv: one A),
the gated dense MLP two (gate_proj, up_proj), an expert's fc1 one on the fused gate_up_proj (one A, B rows [gate; up]),
every other linear one.

Initialisation is PEFT's (A kaiming-uniform with a = sqrt(5), B zero), drawn for the FULL tensor from a generator
seeded by (seed, global name) and then sliced to this rank's shard: the same adapters at every TP/PP/EP layout.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..train.settings import LORA_TARGETS as TARGETS, LoraError, LoraSpec  # noqa: F401 - torch-free, beside the settings

TOWER_PREFIX = {"vision": "vision_model.", "audio": "audio_model."}


# ------------------------------------------------------------------------------------------------------------------
# autograd pieces
# ------------------------------------------------------------------------------------------------------------------
class _SumGradOver(torch.autograd.Function):
    """Identity forward; the gradient summed over `group` backward (a factor whose gradient each rank computes
    from only its shard of the other factor)."""

    @staticmethod
    def forward(ctx, weight, group):
        ctx.group = group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _sum_grad_over(weight: torch.Tensor, group) -> torch.Tensor:
    return _SumGradOver.apply(weight, group) if group is not None and group.size() > 1 else weight


def _interleave(pieces: Sequence[torch.Tensor], groups: int) -> torch.Tensor:
    """Outputs of the parts (each [..., groups * part_width]) in the base layer's row order: per group, the parts
    one after the other (qkv: [q.., k, v] per query group; gated fc1: [gate; up] with one group)."""
    if len(pieces) == 1:
        return pieces[0]
    lead = pieces[0].shape[:-1]
    return torch.cat([p.reshape(*lead, groups, -1) for p in pieces], dim=-1).reshape(*lead, -1)


# ------------------------------------------------------------------------------------------------------------------
# wrappers
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class AdapterShape:
    """One adapter tensor: its full (all-rank) shape, and how this rank's shard is cut from it: `split_dim` split
    over `split_size` ranks (this one `split_rank`), `expert_dim` 0 holding this rank's experts (grouped only).
    `part_rows`: for a B whose rows are several parts each split over the ranks (expert fc1 [gate; up]), the parts'
    full widths."""

    full: Tuple[int, ...]
    split_dim: Optional[int] = None
    split_rank: int = 0
    split_size: int = 1
    experts: Optional[Tuple[int, int]] = None  # (first global expert, local count)
    part_rows: Tuple[int, ...] = ()

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        if self.experts is not None:
            first, count = self.experts
            full = full[first: first + count]
        if self.split_dim is None or self.split_size == 1:
            return full
        if self.part_rows:
            parts = torch.split(full, list(self.part_rows), dim=self.split_dim)
            return torch.cat([p.chunk(self.split_size, self.split_dim)[self.split_rank] for p in parts],
                             dim=self.split_dim)
        return full.chunk(self.split_size, self.split_dim)[self.split_rank]


    def place(self, full: torch.Tensor, local: torch.Tensor) -> None:
        """Write this rank's shard `local` into its slot of `full` (the inverse of `shard`)."""
        if self.experts is not None:
            first, count = self.experts
            full = full[first: first + count]
        if self.split_dim is None or self.split_size == 1:
            full.copy_(local)
            return
        parts = torch.split(full, list(self.part_rows), dim=self.split_dim) if self.part_rows else (full,)
        shards = local.chunk(len(parts), dim=self.split_dim)
        for part, shard in zip(parts, shards):
            part.chunk(self.split_size, self.split_dim)[self.split_rank].copy_(shard)


class _LoraBase(nn.Module):
    """Shared by the wrappers: the frozen base module, the adapter parameters and their shapes."""

    def __init__(self, base: nn.Module, spec: LoraSpec):
        super().__init__()
        self.base = base
        self.scaling = spec.scaling
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.shapes: Dict[str, AdapterShape] = {}

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)  # what mcore reads off the wrapped layer (config, tp_group, ...)

    def forward(self, x, *args, **kwargs):
        """The base layer's (output, bias) with the adapter's delta added (the column and row wrappers; the grouped
        experts' wrapper has its own)."""
        out, bias = self.base(x, *args, **kwargs)
        return out + self.delta(x).to(out.dtype), bias

    def _add(self, name: str, shape: AdapterShape, dtype, device) -> None:
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        local = torch.empty(shape.shard(torch.empty(shape.full, device="meta")).shape, dtype=dtype, device=device)
        param = nn.Parameter(local)
        # mcore's grad norm counts a split factor on every TP rank, a replicated one on the first only (without the
        # tags: tp2 grad norm 0.601 vs tp1 0.689, tests/test_lora.py's layouts test)
        set_tensor_model_parallel_attributes(param, is_parallel=shape.split_size > 1, dim=shape.split_dim or 0,
                                             stride=1)
        self.register_parameter(name, param)
        self.shapes[name] = shape

    def adapters(self) -> Iterator[Tuple[str, nn.Parameter, AdapterShape]]:
        for name, shape in self.shapes.items():
            yield name, getattr(self, name), shape

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The base layer's entries only, under its own names: checkpoints of the base model are unchanged; the
        adapters are saved by train.checkpointing's adapter state (lora_sharded_state_dict)."""
        return self.base.sharded_state_dict(prefix, sharded_offsets, metadata)


class ColumnLora(_LoraBase):
    """LoRA around a ColumnParallelLinear: parts (name, full output rows) in the base's row order per group."""

    def __init__(self, base, spec: LoraSpec, parts: Sequence[Tuple[str, int]], groups: int, shared_a: bool):
        super().__init__(base, spec)
        self.parts, self.groups, self.shared_a = [p for p, _ in parts], groups, shared_a
        self.tp = base.tp_group.size()
        self.tp_rank = base.tp_group.rank()
        self.sp = bool(getattr(base, "sequence_parallel", False)) and self.tp > 1
        # qkv: this rank's query groups; gated fc1 (one group): its [gate shard; up shard]
        self.local_groups = max(groups // self.tp, 1)
        dtype, device = base.weight.dtype, base.weight.device
        r, hidden = spec.rank, base.input_size
        for part, rows in parts:
            if not shared_a or part == self.parts[0]:
                self._add(self._a(part), AdapterShape((r, hidden)), dtype, device)
            self._add(f"lora_B_{part}", AdapterShape((rows, r), 0, self.tp_rank, self.tp), dtype, device)

    def _a(self, part: str) -> str:
        return "lora_A" if self.shared_a else f"lora_A_{part}"

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        if self.sp:
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=self.base.tp_group)
        a_names = [self._a(p) for p in self.parts] if not self.shared_a else ["lora_A"]
        h = F.linear(self.dropout(x), torch.cat([getattr(self, n) for n in a_names]) if len(a_names) > 1
                     else getattr(self, a_names[0]))
        if self.tp > 1:
            h = copy_to_tensor_model_parallel_region(h, group=self.base.tp_group)
        hs = [h] * len(self.parts) if self.shared_a else h.chunk(len(self.parts), dim=-1)
        pieces = [F.linear(hp, getattr(self, f"lora_B_{p}")) for hp, p in zip(hs, self.parts)]
        return _interleave(pieces, self.local_groups) * self.scaling


class RowLora(_LoraBase):
    """LoRA around a RowParallelLinear (input split over TP)."""

    def __init__(self, base, spec: LoraSpec):
        super().__init__(base, spec)
        self.tp = base.tp_group.size()
        self.sp = bool(getattr(base, "sequence_parallel", False)) and self.tp > 1
        dtype, device = base.weight.dtype, base.weight.device
        r = spec.rank
        self._add("lora_A", AdapterShape((r, base.input_size), 1, base.tp_group.rank(), self.tp), dtype, device)
        self._add("lora_B", AdapterShape((base.output_size, r)), dtype, device)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import (
            reduce_from_tensor_model_parallel_region,
            scatter_to_sequence_parallel_region,
        )

        h = F.linear(self.dropout(x), self.lora_A)
        if self.tp > 1:
            h = reduce_from_tensor_model_parallel_region(h, group=self.base.tp_group)
        delta = F.linear(h, self.lora_B) * self.scaling
        if self.sp:
            delta = scatter_to_sequence_parallel_region(delta, group=self.base.tp_group)
        return delta


class GroupedLora(_LoraBase):
    """LoRA around omni_model.model.experts.GroupedLinear: all local experts' A and B as two grouped tensors."""

    def __init__(self, base, spec: LoraSpec):
        super().__init__(base, spec)
        pg = base._pg_collection
        self.etp_group = pg.expt_tp
        etp, etp_rank = self.etp_group.size(), self.etp_group.rank()
        local = base.num_gemms
        experts = (pg.ep.rank() * local, local)
        total = pg.ep.size() * local
        dtype, device = base.weight.dtype, base.weight.device
        r, column = spec.rank, base.parallel_mode == "column"
        rows, cols = base.output_size * (etp if column else 1), base.input_size * (1 if column else etp)
        if column:  # fc1: rows [gate; up], each half split over ETP like the weight's
            self._add("lora_A", AdapterShape((total, r, cols), experts=experts), dtype, device)
            self._add("lora_B", AdapterShape((total, rows, r), 1, etp_rank, etp, experts, (rows // 2, rows // 2)),
                      dtype, device)
        else:
            self._add("lora_A", AdapterShape((total, r, cols), 2, etp_rank, etp, experts), dtype, device)
            self._add("lora_B", AdapterShape((total, rows, r), experts=experts), dtype, device)
        self.column = column
        for param in (self.lora_A, self.lora_B):
            setattr(param, "allreduce", False)  # expert params: grads reduce over the expert-data-parallel group

    def forward(self, x, tokens_per_expert):
        from .experts import grouped_gemm

        out, bias = self.base(x, tokens_per_expert)
        a, b = self.lora_A, self.lora_B
        if self.column:
            a = _sum_grad_over(a, self.etp_group)
        else:
            b = _sum_grad_over(b, self.etp_group)
        h = grouped_gemm(self.dropout(x), a, tokens_per_expert, self.base.backend)
        delta = grouped_gemm(h, b, tokens_per_expert, self.base.backend)
        return out + (delta * self.scaling).to(out.dtype), bias


# ------------------------------------------------------------------------------------------------------------------
# injection
# ------------------------------------------------------------------------------------------------------------------
def _qkv_parts(config) -> Tuple[List[Tuple[str, int]], int]:
    heads, hd = config.num_attention_heads, config.kv_channels
    groups = config.num_query_groups or heads
    return [("q", heads * hd), ("k", groups * hd), ("v", groups * hd)], groups


def _wrap(name: str, module: nn.Module, spec: LoraSpec) -> Optional[nn.Module]:
    """The LoRA wrapper for the module called `name`, or None when no target of `spec` covers it."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from .experts import GroupedLinear

    leaf = name.rsplit(".", 1)[-1]
    tower = next((t for t, prefix in TOWER_PREFIX.items() if name.startswith(prefix)), None)
    if tower is not None:
        wanted = tower in spec.targets
    elif ".mlp.experts." in name:
        wanted = "experts" in spec.targets
    elif ".self_attention." in name:
        wanted = "attention" in spec.targets
    elif ".mlp." in name:
        wanted = "dense_mlp" in spec.targets
    else:
        wanted = False
    if not wanted:
        return None
    if isinstance(module, GroupedLinear):
        return GroupedLora(module, spec)
    if isinstance(module, RowParallelLinear):
        return RowLora(module, spec)
    if not isinstance(module, ColumnParallelLinear):
        return None
    config = module.config
    if leaf == "linear_qkv":
        parts, groups = _qkv_parts(config)
        return ColumnLora(module, spec, parts, groups, shared_a=tower == "vision")  # HF's vision qkv is one Linear
    if leaf == "linear_fc1" and config.gated_linear_unit:
        half = module.output_size // 2
        return ColumnLora(module, spec, [("gate", half), ("up", half)], 1, shared_a=False)
    return ColumnLora(module, spec, [("w", module.output_size)], 1, shared_a=True)


def lora_modules(thinker: nn.Module) -> Iterator[Tuple[str, _LoraBase]]:
    for name, module in thinker.named_modules():
        if isinstance(module, _LoraBase):
            yield name, module


def inject_lora(thinker: nn.Module, spec: LoraSpec, seed: int, initialise: bool = True) -> int:
    """Wrap every targeted linear of `thinker` (call after loading the base weights: the base checkpoint has no
    adapters), initialise the adapters layout-independently, and freeze everything else. Returns the number of
    adapted modules; an error when the targets match nothing on the whole model is left to the caller (a pipeline
    stage may legitimately hold no tower)."""
    targets = [(name, module) for name, module in thinker.named_modules()
               if name and not isinstance(module, _LoraBase) and ".base" not in f".{name}"]
    for param in thinker.parameters():
        param.requires_grad_(False)
    count = 0
    for name, module in targets:
        wrapper = _wrap(name, module, spec)
        if wrapper is None:
            continue
        parent_name, _, leaf = name.rpartition(".")
        setattr(thinker.get_submodule(parent_name) if parent_name else thinker, leaf, wrapper)
        count += 1
    if initialise:
        init_adapters(thinker, seed)
    return count


def _input_requires_grad(_module, args, kwargs):
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor) or hidden.requires_grad or not torch.is_grad_enabled():
        return None
    hidden = hidden.detach().requires_grad_(True)
    if "hidden_states" in kwargs:
        return args, dict(kwargs, hidden_states=hidden)
    return (hidden, *args[1:]), kwargs


def grads_through_full_recompute(thinker: nn.Module) -> None:
    """Make the LLM decoder's input require grad, so that the adapters inside fully recomputed layers are trained.

    mcore's full recompute wraps each layer in a reentrant autograd Function (tensor_parallel.checkpoint): its output
    requires grad only if one of its tensor INPUTS does, whatever the parameters inside. With the base frozen, the
    embedding output does not, so no layer output did, no backward reached an adapter (grad norm 0, and mcore's
    router, which tracks its aux loss only while grad is on, tracked none). The same remedy as transformers'
    `enable_input_require_grads` for PEFT with gradient checkpointing; it costs the first layer's input gradient.
    Later pipeline stages receive an input that already requires grad; the towers recompute with torch's
    non-reentrant checkpoint, which has no such condition."""
    thinker.language_model.decoder.register_forward_pre_hook(_input_requires_grad, with_kwargs=True)


def global_names(thinker: nn.Module) -> Dict[str, str]:
    """{local module name: global module name} of the adapted modules: the LLM's layer index made global (pipeline
    stages number their layers from 0)."""
    out = {}
    for name, module in lora_modules(thinker):
        out[name] = _global_name(thinker, name)
    return out


_LAYER = re.compile(r"^(language_model\.decoder\.layers\.)(\d+)\.")


def _global_name(thinker: nn.Module, name: str) -> str:
    match = _LAYER.match(name)
    if not match:
        return name
    layer = thinker.get_submodule(match.group(0)[:-1])
    return f"{match.group(1)}{layer.layer_number - 1}.{name[match.end():]}"


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63))


@torch.no_grad()
def init_adapters(thinker: nn.Module, seed: int, b_std: float = 0.0) -> None:
    """PEFT's init (A: kaiming-uniform a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)); B: zero, or N(0, b_std) when a
    test wants non-zero gradients everywhere), drawn full-size per tensor and sliced to this rank's shard."""
    for name, global_name in global_names(thinker).items():
        module = thinker.get_submodule(name)
        for pname, param, shape in module.adapters():
            gen = _generator(seed, f"{global_name}.{pname}")
            full = torch.empty(shape.full, dtype=torch.float32)
            if pname.startswith("lora_A"):
                bound = 1.0 / math.sqrt(shape.full[-1])
                full.uniform_(-bound, bound, generator=gen)
            elif b_std:
                full.normal_(0.0, b_std, generator=gen)
            else:
                full.zero_()
            param.copy_(shape.shard(full))


def adapter_parameters(thinker: nn.Module) -> Iterator[Tuple[str, nn.Parameter, AdapterShape]]:
    """(global adapter key, parameter, shape) of every adapter of this rank; keys `<global module>.<lora_A|B...>`."""
    for name, global_name in global_names(thinker).items():
        for pname, param, shape in thinker.get_submodule(name).adapters():
            yield f"{global_name}.{pname}", param, shape


@torch.no_grad()
def merge_lora(thinker: nn.Module) -> None:
    """Fold every adapter into its base weight (W += scaling * B A per part, in the base's row order) and put the
    base modules back: the thinker is a plain one again, with the base's state-dict names."""
    for name, module in list(lora_modules(thinker)):
        weight = module.base.weight
        weight.add_(module_delta_weight(module).to(weight.dtype))
        parent_name, _, leaf = name.rpartition(".")
        setattr(thinker.get_submodule(parent_name) if parent_name else thinker, leaf, module.base)


def module_delta_weight(module: _LoraBase) -> torch.Tensor:
    """scaling * B A of one wrapper, shaped like its (local) base weight, in fp32."""
    if isinstance(module, GroupedLora):
        return torch.bmm(module.lora_B.float(), module.lora_A.float()) * module.scaling
    if isinstance(module, RowLora):
        return (module.lora_B.float() @ module.lora_A.float()) * module.scaling
    pieces = [(getattr(module, f"lora_B_{p}").float() @ getattr(module, module._a(p)).float()).t()
              for p in module.parts]  # [in, rows_p]: the interleave works on the last dim
    return _interleave(pieces, module.local_groups).t() * module.scaling


# ------------------------------------------------------------------------------------------------------------------
# PEFT: the adapters as transformers + peft hold them
# ------------------------------------------------------------------------------------------------------------------
# transformers 5 Qwen3-Omni thinker module names (under the full model's `thinker.`): the LLM at
# `model.language_model.layers.N`, attention q/k/v/o_proj nn.Linear's, routed experts as ONE module holding fused 3-D
# parameters gate_up_proj [E, 2F, H] and down_proj [E, H, F], which PEFT adapts through `target_parameters`
# (one ParamWrapper per parameter, nested in the order given: gate_up_proj inside, down_proj outside).
_PEFT_ATTENTION = {"linear_qkv.lora_A_q": "q_proj.lora_A", "linear_qkv.lora_B_q": "q_proj.lora_B",
                   "linear_qkv.lora_A_k": "k_proj.lora_A", "linear_qkv.lora_B_k": "k_proj.lora_B",
                   "linear_qkv.lora_A_v": "v_proj.lora_A", "linear_qkv.lora_B_v": "v_proj.lora_B",
                   "linear_proj.lora_A": "o_proj.lora_A", "linear_proj.lora_B": "o_proj.lora_B"}
_PEFT_EXPERTS = {"linear_fc1": ("base_layer.", "gate_up_proj"), "linear_fc2": ("", "down_proj")}
_OURS = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.(self_attention|mlp\.experts)\.(.+)$")
PEFT_EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # target_parameters order per layer: the nesting above


def _peft_expert_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Ours [E, r, in] (A) / [E, out, r] (B) -> PEFT's ParamWrapper weights: lora_A [E*r, in] (expert-major rows),
    lora_B [out, r*E] (column k*E + e = expert e's column k)."""
    experts, rows, cols = tensor.shape
    if name.endswith("lora_A"):
        return tensor.reshape(experts * rows, cols)
    return tensor.permute(1, 2, 0).reshape(rows, cols * experts)


def to_peft(adapters: Dict[str, torch.Tensor], spec: LoraSpec, module_prefix: str = "thinker.model.") -> tuple:
    """The full (all-rank) adapters {global key: tensor} as a PEFT adapter: (state dict as PEFT saves it, LoraConfig)
    for transformers' Qwen3-Omni (`module_prefix` 'thinker.model.': the full model; 'model.': the thinker alone).
    Only the LLM's attention and experts have a PEFT form here; other targets raise LoraError naming them."""
    from peft import LoraConfig

    state, attention_layers, expert_layers = {}, set(), set()
    for key, tensor in adapters.items():
        match = _OURS.match(key)
        if match is None or (match.group(2) == "self_attention" and match.group(3) not in _PEFT_ATTENTION):
            raise LoraError(f"adapter {key} has no PEFT form here (only the LLM's attention and experts do): export "
                            f"it with export.lora: merged")
        layer, block, leaf = match.groups()
        base = f"base_model.model.{module_prefix}language_model.layers.{layer}"
        if block == "self_attention":
            state[f"{base}.self_attn.{_PEFT_ATTENTION[leaf]}.weight"] = tensor
            attention_layers.add(int(layer))
        else:
            module, factor = leaf.split(".")
            nesting, _ = _PEFT_EXPERTS[module]
            state[f"{base}.mlp.experts.{nesting}{factor}.weight"] = _peft_expert_tensor(factor, tensor)
            expert_layers.add(int(layer))
    if spec.dropout and expert_layers:
        raise LoraError(f"train.lora.dropout = {spec.dropout}: PEFT's adapters of expert parameters have no dropout, "
                        f"so these expert adapters have no PEFT form; export them with export.lora: merged")
    # explicit module names: PEFT's regex targets also matched the audio tower's q/k/v_proj (seen with peft 0.21.2)
    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        target_modules=[f"{module_prefix}language_model.layers.{layer}.self_attn.{proj}"
                        for layer in sorted(attention_layers) for proj in ("q_proj", "k_proj", "v_proj", "o_proj")]
        or None,
        target_parameters=[f"{module_prefix}language_model.layers.{layer}.mlp.experts.{param}"
                           for layer in sorted(expert_layers) for param in PEFT_EXPERT_PARAMS] or None)
    return state, config


# ------------------------------------------------------------------------------------------------------------------
# checkpoints: the adapters as full (all-rank) tensors, reshardable to any layout
# ------------------------------------------------------------------------------------------------------------------
CHECKPOINT_PREFIX = "lora."


def _replica_id(module: _LoraBase, shape: AdapterShape) -> tuple:
    """0 on the one rank that writes a tensor's shard; the others hold copies (mcore's (tp, pp, dp) replica id)."""
    from megatron.core import parallel_state as ps

    split = shape.split_size > 1
    if isinstance(module, GroupedLora):
        return (0 if split else ps.get_expert_tensor_parallel_rank(), 0, ps.get_expert_data_parallel_rank())
    return (0 if split else ps.get_tensor_model_parallel_rank(), 0,
            ps.get_data_parallel_rank(with_context_parallel=True))


def _sharded(key: str, data: torch.Tensor, shape: AdapterShape, replica_id) -> object:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    offsets = []
    if shape.experts is not None:
        first, count = shape.experts
        offsets.append((0, first // count, shape.full[0] // count))
    if shape.split_size > 1:
        offsets.append((shape.split_dim, shape.split_rank, shape.split_size))
    return ShardedTensor.from_rank_offsets(key, data, *offsets, replica_id=replica_id)


def _parts_factory(key: str, param: torch.Tensor, shape: AdapterShape, replica_id):
    """A B whose local rows are several parts each split over the ranks ([gate_shard; up_shard]): saved as one tensor
    per part (`<key>.part<i>`), so that it reshards over ETP like the weight's gate/up halves."""
    from dataclasses import replace as dc_replace

    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    def build(key, data, replica_id, flattened_range):
        assert flattened_range is None, "flattened optimizer state: use a fully reshardable optimizer format"
        pieces = data.chunk(len(shape.part_rows), dim=shape.split_dim)  # this rank's [gate shard; up shard]
        out = {}
        for i, (rows, piece) in enumerate(zip(shape.part_rows, pieces)):
            full = list(shape.full)
            full[shape.split_dim] = rows
            out[i] = _sharded(f"{key}.part{i}", piece, dc_replace(shape, full=tuple(full), part_rows=()), replica_id)
        return out

    def merge(loaded: dict):
        return torch.cat([loaded[i] for i in range(len(shape.part_rows))], dim=shape.split_dim)

    return ShardedTensorFactory(key=key, data=param, build_fn=build, merge_fn=merge, replica_id=replica_id)


def lora_sharded_state_dict(thinker: nn.Module) -> dict:
    """{`lora.<global key>`: ShardedTensor (or factory) over the adapter parameter itself}: mcore's optimizer maps its
    states to these by parameter identity, so optimizer states reshard like the adapters."""
    out = {}
    for name, global_name in global_names(thinker).items():
        module = thinker.get_submodule(name)
        for pname, param, shape in module.adapters():
            key = f"{CHECKPOINT_PREFIX}{global_name}.{pname}"
            replica_id = _replica_id(module, shape)
            if shape.part_rows:  # at every ETP size, or a checkpoint of one would not load at another
                out[key] = _parts_factory(key, param, shape, replica_id)
            else:
                out[key] = _sharded(key, param, shape, replica_id)
    return out


@torch.no_grad()
def load_adapters(thinker: nn.Module, loaded: dict) -> None:
    """Copy loaded adapter tensors ({checkpoint key: this rank's shard}) into the parameters; every adapter must be
    there."""
    for name, global_name in global_names(thinker).items():
        for pname, param, _ in thinker.get_submodule(name).adapters():
            key = f"{CHECKPOINT_PREFIX}{global_name}.{pname}"
            if key not in loaded:
                raise LoraError(f"the adapter checkpoint lacks {key}: it was trained with other train.lora targets")
            param.copy_(loaded[key])


def full_adapters_from_checkpoint(checkpoint_dir) -> Dict[str, torch.Tensor]:
    """{global key: full tensor} of every adapter in a training checkpoint, read in one process at any layout it was
    written at (the parts of a split expert B put back together)."""
    from megatron.core import dist_checkpointing

    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    metadata = dist_checkpointing.load_tensors_metadata(str(checkpoint_dir))
    # the tensors only: the common state's LoRA settings (`lora.rank`, ...) are listed under the same prefix
    request = {key: sh for key, sh in metadata.items()
               if key.startswith(CHECKPOINT_PREFIX) and isinstance(sh, ShardedTensor) and ".lora_" in key}
    for sh in request.values():
        sh.data = torch.empty(sh.global_shape, dtype=sh.dtype)
    loaded = dist_checkpointing.load(request, str(checkpoint_dir), validate_access_integrity=False)
    out, parts = {}, {}
    for key in request:  # `loaded` also holds the checkpoint's common state (iteration, scheduler, ...)
        tensor = loaded[key]
        match = re.match(r"^(.*)\.part(\d+)$", key)
        if match:
            parts.setdefault(match.group(1), {})[int(match.group(2))] = tensor
        else:
            out[key] = tensor
    for key, pieces in parts.items():
        out[key] = torch.cat([pieces[i] for i in sorted(pieces)], dim=1)  # expert B [E, rows, r]: parts are rows
    return {key[len(CHECKPOINT_PREFIX):]: tensor for key, tensor in sorted(out.items())}
