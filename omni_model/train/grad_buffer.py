"""mcore's DDP with each step's first gradient of a parameter WRITTEN into its fp32 main grad instead of added.

mcore zeroes every grad buffer at the start of a step (`zero_grad_buffer`: a pass writing 4 bytes per trained
parameter) and its backward hook adds each micro-batch's bf16 grad into the fp32 main grad (reading 4 + 2, writing 4
bytes). The first micro-batch's add reads a buffer it has just zeroed: writing the grad there instead (`copy_`:
reading 2, writing 4) gives the same fp32 values (0 + g == g) for 8 bytes less per parameter and step. On the H100's
text step (3.1 B trained parameters) the zeroing was 3.8 ms and each micro-batch's accumulation 12.8 ms
(bench/RESULTS.md, issue 27).

What must stay true without the zeroing: a main grad holds only this step's grads when the optimizer reads it. A
parameter whose first grad of the step arrives in any micro-batch is written then (not only in the first: a vision
weight sees no grad in a text-only micro-batch); one that saw no grad in the whole step (a text-only step of a model
with trained towers) is zeroed before the grads are reduced (`finish_grad_sync`, which finalize_model_grads calls
first). The buffers' padding is never written by a hook and stays the zeros it was allocated with.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.transformer.cuda_graphs import is_graph_capturing


class FirstWriteDDP(DistributedDataParallel):
    """DistributedDataParallel whose grad buffers are not zeroed per step: each parameter's first grad of a step is
    copied into its main grad, later ones added (mcore's hook); parameters left without a grad are zeroed before the
    grad sync. Needs grads that reach main_grad only through the hook (no gradient_accumulation_fusion)."""

    def __init__(self, config, ddp_config, module, **kwargs):
        if getattr(config, "gradient_accumulation_fusion", False):
            raise ValueError("first-write grads need grads that reach main_grad through DDP's hook: "
                             "gradient_accumulation_fusion adds into main_grad inside the wgrad GEMM")
        self._unwritten: set = set()  # parameters with no grad written yet this step (read by the hooks)
        super().__init__(config=config, ddp_config=ddp_config, module=module, **kwargs)
        if any(bucket.params_with_extra_main_grads for buffer in self.buffers + self.expert_parallel_buffers
               for bucket in buffer.buckets):
            raise ValueError("first-write grads keep main grads in the grad buffers (grad_reduce_in_fp32=True)")
        self._unwritten.update(self.params_with_grad)  # the hooks hold this set: filled, not rebound

    def _make_backward_post_hook(self, param: torch.nn.Parameter):
        accumulate = super()._make_backward_post_hook(param)
        unwritten = self._unwritten

        def hook(*unused):
            if param in unwritten and param.grad is not None and not is_graph_capturing():
                unwritten.discard(param)
                if not param.grad_added_to_main_grad:
                    param.main_grad.copy_(param.grad.data)
                    param.grad = None  # mcore's hook below then has nothing to add
            accumulate(*unused)

        return hook

    def zero_grad_buffer(self):
        """mcore's per-step reset (flags, bucket groups) without zeroing the buffers: every parameter is marked
        unwritten instead."""
        for param in self.params_with_grad:
            param.grad_added_to_main_grad = False
        for bucket_group in self.bucket_groups + self.expert_parallel_bucket_groups:
            bucket_group.reset()
        self._unwritten.clear()
        self._unwritten.update(self.params_with_grad)

    def finish_grad_sync(self, *args, **kwargs):
        if self._unwritten:  # no grad this step: last step's values are still there
            torch._foreach_zero_([param.main_grad for param in self._unwritten])
            self._unwritten.clear()
        return super().finish_grad_sync(*args, **kwargs)
