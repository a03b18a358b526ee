"""mcore's Column/RowParallelLinear, minus mcore's Python autograd Function where that Function only multiplies.

mcore routes every linear through `LinearWithGradAccumulationAndAsyncCommunication`, a Python autograd Function
whose backward also serves the tensor-parallel all-reduce of the input gradient, sequence parallelism, gradient-
accumulation fusion (apex/TE) and deferred embedding wgrads. When none of these is on (one TP rank, or a row-parallel
layer, which reduces outside the Function; no apex/TE fusion), its backward is two matmuls, run from Python with
~20 lines of bookkeeping per call. The towers make ~240 such calls per step (59 layers x 4 linears): on an H200 the
multimodal training step is host-bound, and `F.linear` does the same matmuls in torch's C++ autograd (same run: the
step 722 -> 661 ms, +9.2 % tokens/s, the GPU work unchanged; bench/RESULTS.md, session 6). Everything else
(parameters, init, sharded state dicts, the TP collectives around the matmul) stays mcore's: only `_forward_impl`, the
method mcore itself swaps for frozen weights, is chosen differently.

`F.linear` adds a bias inside the matmul (cuBLAS epilogue) where mcore adds it after, as transformers' `nn.Linear`
does: tests/test_linear.py holds it to mcore's layer, the tower parity tests to transformers'. The same goes for the
bias mcore hands back to its caller (`skip_bias_add`: the towers' attention projection and fc2 feed it to the
bias-dropout-add, fc1 to the MLP's bias + activation): at one TP rank nothing happens to the matmul's output before
that add, so the bias goes inside the matmul and the caller gets None (the callers skip a None bias): three
elementwise kernels fewer per tower layer and forward (~500 of the ~6,300 launches of the H100's multimodal step).
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from .options import DEFAULT


def only_a_matmul(gradient_accumulation_fusion=False, allreduce_dgrad=False, sequence_parallel=False,
                  grad_output_buffer=None, gtp_remat_size=1, **_) -> bool:
    """Whether mcore's linear Function, called with these arguments, would do nothing but `input @ weight.T + bias`
    forward and the two matmuls backward (mcore 0.19's gtp_remat_size > 1 gathers a sharded weight first)."""
    return not (gradient_accumulation_fusion or allreduce_dgrad or sequence_parallel
                or grad_output_buffer is not None or (gtp_remat_size or 1) > 1)


class _LocalMatmul:
    plain_matmul = DEFAULT.plain_matmul_when_local  # False: always mcore's Function (bench `linear=mcore`)
    bias_in_matmul = DEFAULT.bias_in_matmul  # False: mcore's (output, bias) (bench `bias=after`)

    def use_options(self, options) -> None:
        self.plain_matmul = options.plain_matmul_when_local
        self.bias_in_matmul = options.bias_in_matmul

    def _forward_impl(self, input, weight, bias=None, **kwargs):
        if self.plain_matmul and only_a_matmul(**kwargs):
            return F.linear(input, weight, bias)
        return super()._forward_impl(input, weight, bias=bias, **kwargs)

    def _bias_folds(self) -> bool:
        """Whether the bias mcore would hand back for the caller to add can go inside the matmul: the plain-matmul
        path at one TP rank (no reduction or gather between the matmul and the bias), and no fused kernel of the
        caller's waiting for the bias."""
        config = self.config
        return (self.plain_matmul and self.bias_in_matmul and self.skip_bias_add and self.bias is not None
                and self.tp_group.size() == 1
                and not (self.sequence_parallel or self.gradient_accumulation_fusion or self.gtp_remat_size > 1
                         or getattr(self, "explicit_expert_comm", False) or config.defer_embedding_wgrad_compute
                         or config.bias_activation_fusion or config.bias_dropout_fusion
                         or config._cpu_offloading_context is not None))

    def forward(self, input_, *args, **kwargs):
        if args or kwargs or not self._bias_folds():  # (a weight passed in, a gather asked for: mcore's own)
            return super().forward(input_, *args, **kwargs)
        return F.linear(input_, self.weight, self.bias), None


class LocalColumnParallelLinear(_LocalMatmul, ColumnParallelLinear):
    """ColumnParallelLinear; a plain `F.linear` when no TP/SP communication or fusion rides in the backward."""


class LocalRowParallelLinear(_LocalMatmul, RowParallelLinear):
    """RowParallelLinear (its TP reduction is outside the matmul); a plain `F.linear` when no fusion is on."""
