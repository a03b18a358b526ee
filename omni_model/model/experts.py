"""Grouped-GEMM experts without TransformerEngine: one `torch._grouped_mm` launch for all local experts.

`GroupedGemmExperts` is mcore's `TEGroupedMLP` (same forward, activation-with-probs, sharded state dict, ETP/EP
handling) with its two TE `GroupedLinear`s replaced by `GroupedLinear` below (one [E, out, in] parameter; its
Column/RowGroupedLinear classes are builders of mcore 0.19's `GroupedLinearFc1Builder`/`Fc2Builder` protocols), whose
state-dict names are the TE spec's: `mlp.experts.linear_fc1.weight{e}` [2*F/etp, H] (rows = [gate_shard; up_shard]) and
`mlp.experts.linear_fc2.weight{e}` [H, F/etp], e = local expert index. Communication across EP/ETP is the token
dispatcher's job (as with TE: "explicit expert comm"); these linears never communicate.

GEMM backends (`grouped_gemm`):
- CUDA, bf16/fp16, `torch._grouped_mm` present (torch >= 2.8, Hopper+): native op + native autograd.
- CPU: `torch._grouped_mm` forward and a custom backward built from `_grouped_mm` (the CPU op's own autograd fails
  on some stride patterns).
- anything else (fp32 on CUDA, old torch): a per-expert loop, exact.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name
from megatron.core.transformer.moe.experts import TEGroupedMLP
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from . import fused_kernels


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """`a` and `b` are the same view of the same memory (what an in-place checkpoint load hands back)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _offsets(tokens_per_expert, device) -> torch.Tensor:
    """End offsets of the expert groups (int32, on `device`). From a device tensor of counts this is a cumsum on
    the device: no host sync, unlike mcore's `tokens_per_expert.tolist()` before every grouped GEMM."""
    counts = torch.as_tensor(tokens_per_expert)
    return counts.to(device=device, non_blocking=True).cumsum(0).to(torch.int32)


class _CpuGroupedMM(torch.autograd.Function):
    """y = x_e @ w_e^T per expert group; x [T, in], w [E, out, in]."""

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch._grouped_mm(dy, w.contiguous(), offs=offs)
        if ctx.needs_input_grad[1]:
            dw = torch._grouped_mm(dy.t(), x.contiguous(), offs=offs)  # [E, out, in]
        return dx, dw, None


def _loop_mm(x, w, tokens_per_expert):
    splits = [int(n) for n in torch.as_tensor(tokens_per_expert).tolist()]
    outs = [xi @ w[e].t() for e, xi in enumerate(torch.split(x, splits))]
    return torch.cat(outs, dim=0) if outs else x.new_zeros(0, w.shape[1])


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert, backend: str = "auto") -> torch.Tensor:
    """Rows of `x` grouped by expert (`tokens_per_expert[e]` rows each: a list or a tensor of counts) times each
    expert's `w[e]^T`. backend: auto|loop."""
    has_gmm = hasattr(torch, "_grouped_mm")
    if backend == "loop" or not has_gmm:
        return _loop_mm(x, w, tokens_per_expert)
    es = x.element_size()
    if (x.shape[-1] * es) % 16 or (w.shape[1] * es) % 16:  # _grouped_mm needs 16-byte aligned rows
        return _loop_mm(x, w, tokens_per_expert)
    x = x.contiguous()
    offs = _offsets(tokens_per_expert, x.device)
    if x.is_cuda:
        if x.dtype in (torch.bfloat16, torch.float16):
            return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
        return _loop_mm(x, w, tokens_per_expert)
    return _CpuGroupedMM.apply(x, w, offs)


class GroupedLinear(nn.Module):
    """All local experts' weights in ONE parameter `weight` [E, out, in]; forward = one grouped GEMM on it.

    One contiguous parameter, not E parameters stacked per step: `torch.stack` would copy every expert weight on
    each forward (0.8 GB per layer for fc1 at the 30B shape) and keep the copy alive for backward. The state dict
    still speaks TE's per-expert names `weight{e}` (views of the slices), so checkpoints and the HF mapping are the
    same with or without TransformerEngine.
    """

    def __init__(
        self,
        num_gemms: int,
        input_size: int,
        output_size: int,
        *,
        parallel_mode: Optional[str],
        config,
        init_method,
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool = True,
        tp_comm_buffer_name: Optional[str] = None,
        pg_collection=None,
        name: Optional[str] = None,
    ):
        super().__init__()
        assert is_expert, "GroupedLinear is for experts"
        assert not bias, "Qwen3-Omni experts have no bias"
        self.config = config
        self.num_gemms = num_gemms
        self.parallel_mode = parallel_mode
        self._pg_collection = pg_collection
        self._tp_group = pg_collection.expt_tp
        tp_size = self._tp_group.size()
        if parallel_mode == "column":
            output_size //= tp_size
        elif parallel_mode == "row":
            input_size //= tp_size
        self.input_size, self.output_size = input_size, output_size
        self.use_bias = False
        self.expert_parallel = config.expert_model_parallel_size > 1
        self.backend = "auto"
        device = None if config.use_cpu_initialization or not torch.cuda.is_available() else torch.cuda.current_device()
        self.weight = nn.Parameter(
            torch.empty(num_gemms, output_size, input_size, dtype=config.params_dtype, device=device))
        if config.perform_initialization:
            self._init_experts(init_method)
        # the TP-split dim of one expert's [out, in] matrix, +1 for the leading expert axis
        set_tensor_model_parallel_attributes(
            self.weight, is_parallel=tp_size > 1, dim=1 if parallel_mode == "column" else 2, stride=1)
        # experts reduce their grads over the EXPERT data-parallel group, also without EP: at tp > 1 with etp 1 every
        # TP rank holds all experts and routes only its own sequence shard (mcore's `not expert_parallel` put them in
        # the dense DP group and left their grads unsummed across TP ranks; test_train_layouts caught it)
        setattr(self.weight, "allreduce", False)
        self._register_state_dict_hook(_split_experts_in_state_dict)
        self._register_load_state_dict_pre_hook(self._stack_experts_from_state_dict)

    def _init_experts(self, init_method) -> None:
        tracker = get_cuda_rng_tracker()
        name = get_expert_parallel_rng_tracker_name()
        forked = tracker.is_initialized() and name in tracker.get_states()
        with torch.no_grad():
            for e in range(self.num_gemms):  # one init call per expert, as TE's GroupedLinear does
                if forked:
                    with tracker.fork(name):
                        init_method(self.weight[e])
                else:
                    init_method(self.weight[e])

    def _stack_experts_from_state_dict(self, state_dict, prefix, *args) -> None:
        names = [f"{prefix}weight{e}" for e in range(self.num_gemms)]
        if all(name in state_dict for name in names):
            experts = [state_dict.pop(name) for name in names]
            # a checkpoint loaded in place hands back views of our own weight: no stacked copy (a layer's size)
            in_place = all(same_view(t, self.weight[e]) for e, t in enumerate(experts))
            state_dict[prefix + "weight"] = self.weight if in_place else torch.stack(experts)

    def forward(self, x: torch.Tensor, tokens_per_expert):
        return grouped_gemm(x, self.weight, tokens_per_expert, self.backend), None

    def backward_dw(self):
        pass

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Like TE's grouped linears: one ShardedTensor per global expert, EP axis prepended."""
        tp_axis = 0 if self.parallel_mode == "column" else 1
        singleton_local_shards = (metadata or {}).get("singleton_local_shards", False)
        ep_group = self._pg_collection.ep
        num_global = ep_group.size() * self.num_gemms
        offset = ep_group.rank() * self.num_gemms
        ep_axis = len(sharded_offsets)
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

        out = {}
        for e in range(self.num_gemms):
            g = offset + e
            sd = {f"{e}.weight": self.weight[e]}
            if singleton_local_shards:
                expert_prefix, offs = f"{g}.{prefix}", sharded_offsets
            else:
                expert_prefix, offs = prefix, (*sharded_offsets, (ep_axis, g, num_global))
            sub = make_sharded_tensors_for_checkpoint(
                sd, "", {f"{e}.weight": tp_axis}, offs, tp_group=self._tp_group, dp_cp_group=metadata["dp_cp_group"]
            )
            replace_prefix_for_sharding(sub, f"{e}.", expert_prefix)
            out[f"{prefix}weight{e}"] = sub[f"{e}.weight"]
        edp_rank = self._pg_collection.expt_dp.rank() if self._pg_collection.expt_dp is not None else 0
        for sh in out.values():
            sh.replica_id = (*sh.replica_id[:2], edp_rank)
        return out


def _split_experts_in_state_dict(module: "GroupedLinear", state_dict, prefix, local_metadata) -> None:
    """state_dict hook: `weight` [E, out, in] -> TE's per-expert names `weight{e}` (views, no copy)."""
    stacked = state_dict.pop(prefix + "weight", None)
    if stacked is not None:
        for e in range(module.num_gemms):
            state_dict[f"{prefix}weight{e}"] = stacked[e]


class ColumnGroupedLinear(GroupedLinear):
    def __init__(self, num_gemms, input_size, output_size, **kw):
        super().__init__(num_gemms, input_size, output_size, parallel_mode="column", **kw)


class RowGroupedLinear(GroupedLinear):
    def __init__(self, num_gemms, input_size, output_size, **kw):
        super().__init__(num_gemms, input_size, output_size, parallel_mode="row", **kw)


def swiglu_with_probs(fc1_output: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up * routing prob, rows = [gate | up] halves of fc1's output. A module-level function so that a
    benchmark can swap in a compiled version (bench/train_throughput.py --variant compile)."""
    gate, linear = torch.chunk(fc1_output, 2, dim=-1)
    return (torch.nn.functional.silu(gate) * linear * probs.unsqueeze(-1)).to(fc1_output.dtype)


class GroupedGemmExperts(TEGroupedMLP):
    """mcore's TEGroupedMLP driven by torch grouped GEMMs (build with ColumnGroupedLinear/RowGroupedLinear)."""

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        """TEGroupedMLP's forward minus its `tokens_per_expert.tolist()`: that host sync, once per MoE layer and
        pass, stalls the launch queue; the grouped GEMMs take the counts as a device tensor instead. The features
        we do not use (fp8/fp4 padding, activation recompute, CPU offload, mcore 0.19's TE op fuser and interleaved
        GLU rows) keep mcore's own forward."""
        config = self.config
        if (config.fp8 or config.fp4 or self.activation_recompute or self.offload_expert_fc1 or self.offload_moe_act
                or self._with_fused_impl or config.moe_mlp_glu_interleave_size is not None):
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        assert config.gated_linear_unit and config.activation_func is torch.nn.functional.silu
        fc1_output, _ = self.linear_fc1(permuted_local_hidden_states, tokens_per_expert)
        if self.fused_swiglu and fc1_output.is_cuda and fused_kernels.available():
            activated = fused_kernels.swiglu_with_probs(fc1_output, permuted_probs)
        else:
            activated = swiglu_with_probs(fc1_output, permuted_probs)
        output, _ = self.linear_fc2(activated, tokens_per_expert)
        return output, None

    fused_swiglu = True  # PerfOptions.fused_swiglu (apply_options sets it on the instance)

    def use_options(self, options) -> None:
        self.fused_swiglu = options.fused_swiglu

    def set_backend(self, backend: str) -> None:
        """'auto' (grouped GEMM) or 'loop' (per-expert reference, used by the equality test)."""
        self.linear_fc1.backend = backend
        self.linear_fc2.backend = backend
