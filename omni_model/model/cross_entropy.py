"""Per-token cross-entropy over vocab-parallel logits: on the GPU in two reads of the logits, not a dozen.

mcore's `vocab_parallel_cross_entropy` takes `logits.float()` and then makes five more full passes over an fp32
[tokens, vocab] tensor (max, subtract, exp, sum, divide), keeps the fp32 softmax for the backward and makes three more
there (the target update, the scale by the incoming gradient, the cast back to bf16). At 16k tokens x 152,064 vocab
that is a 10 GB tensor read and written ~12 times: ~11 % of an H200 training step of the 4-layer 30B-A3B thinker and
5 GB more peak memory (bench/RESULTS.md, issue 12).

On the GPU the same fp32 math is two functions of the bf16 logits that torch.compile fuses into one reduction (the
exp-sum and the target's logit per row) and one pointwise kernel (the gradient, written in the logits' dtype); the
backward keeps the logits themselves (bf16: half of mcore's fp32 softmax) and recomputes the softmax from them. On the
CPU (tests, the embedded default) mcore's function runs: it works in place, which suits eager mode, and the CPU has
no compiler to fuse with. Tensor parallelism: each rank holds a vocab slice; the row max, the exp-sums and the target
logits are all-reduced over the TP group exactly as in mcore, so the loss is the same function.

Loss per token: log(sum_v exp(x_v - m)) - (x_target - m), m = the row max over the whole vocab (all TP ranks).
Gradient: (softmax - onehot(target)) * grad_output, onehot only on the rank that holds the target. A target outside
the vocab (an ignore label such as -100) has no onehot anywhere: its 'loss' is log sum exp(x - m), as in mcore, and
the caller masks it out.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel



def _row_stats(logits: torch.Tensor, row_max: torch.Tensor, local_target: torch.Tensor, on_rank: torch.Tensor):
    """fp32 (sum of exp(x - m) over this rank's vocab slice, x_target - m where the target is on this rank else 0)."""
    shifted = logits.float() - row_max[:, None]
    target_logit = torch.gather(shifted, 1, local_target[:, None]).squeeze(1)
    sum_exp = torch.exp(shifted).sum(dim=-1)
    return sum_exp, torch.where(on_rank, target_logit, torch.zeros_like(target_logit))


def _logits_grad(logits: torch.Tensor, row_max: torch.Tensor, sum_exp: torch.Tensor, local_target: torch.Tensor,
                 on_rank: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """d loss / d logits in the logits' dtype: (softmax - onehot) * grad_loss, row by row; one pointwise expression
    (the onehot as a column comparison) for torch.compile to make one kernel of."""
    softmax = torch.exp(logits.float() - row_max[:, None]) / sum_exp[:, None]
    columns = torch.arange(logits.shape[-1], device=logits.device)
    onehot = (columns[None, :] == local_target[:, None]) & on_rank[:, None]
    return ((softmax - onehot.float()) * grad_loss[:, None]).to(logits.dtype)


@functools.cache
def _compiled(fn):
    # torch's automatic dynamic shapes: the first batch compiles for its shapes, the next (another token count)
    # recompiles with only the token count symbolic. Not dynamic=True: that makes the vocab symbolic too, and the
    # gradient kernel's flat index then divides by a runtime int64 per element. H200, 16k tokens: 10.5 ms with
    # dynamic=True, 6.2 ms with the vocab a constant (bench/RESULTS.md, session 6).
    return torch.compile(fn, fullgraph=True)


def _maybe_compiled(fn, tensor: torch.Tensor):
    return _compiled(fn) if tensor.is_cuda else fn  # eager (tests on the CPU): the same math, unfused


class FusedVocabParallelCrossEntropy(torch.autograd.Function):
    """The fused form (compiled on the GPU). Called directly on the CPU only by the tests, eagerly."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, tp_group):
        vocab_slice = logits.shape[-1]
        rows = logits.reshape(-1, vocab_slice)
        target = target.reshape(-1)
        split = tp_group is not None and dist.is_initialized() and dist.get_world_size(tp_group) > 1
        first = dist.get_rank(tp_group) * vocab_slice if split else 0
        on_rank = (target >= first) & (target < first + vocab_slice)
        local_target = torch.where(on_rank, target - first, torch.zeros_like(target))

        row_max = rows.amax(dim=-1).float()  # a selection: exact in the logits' dtype
        if split:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
        sum_exp, target_logit = _maybe_compiled(_row_stats, rows)(rows, row_max, local_target, on_rank)
        if split:
            both = torch.stack([sum_exp, target_logit])
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=tp_group)
            sum_exp, target_logit = both[0], both[1]

        ctx.save_for_backward(rows, row_max, sum_exp, local_target, on_rank)
        ctx.logits_shape = logits.shape
        return (torch.log(sum_exp) - target_logit).view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        rows, row_max, sum_exp, local_target, on_rank = ctx.saved_tensors
        grad = _maybe_compiled(_logits_grad, rows)(rows, row_max, sum_exp, local_target, on_rank,
                                                   grad_loss.reshape(-1).float())
        return grad.view(ctx.logits_shape), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None,
                                 fuse_on_gpu: bool = True) -> torch.Tensor:
    """Per-token loss [...] (fp32) of `logits` [..., V/tp] (this rank's vocab slice, any float dtype) against `target`
    [...] (global vocab ids); `tp_group` the tensor-parallel group the vocab is split over (None: not split for the
    fused form; parallel_state's TP group for mcore's). `fuse_on_gpu`: PerfOptions.fuse_ce_on_gpu (False: mcore's
    function on the GPU too, the bench's `ce=mcore` baseline)."""
    if logits.is_cuda and fuse_on_gpu:
        return FusedVocabParallelCrossEntropy.apply(logits, target, tp_group)
    return tensor_parallel.vocab_parallel_cross_entropy(logits, target, tp_group=tp_group)
