"""Softmax top-k router of Qwen3-Omni on mcore's TopKRouter, without any TransformerEngine symbol.

HF: probs = softmax(logits) in fp32; top-k; if norm_topk_prob: renormalise the k probabilities.
mcore TopKRouter with score_function='softmax':
- `moe_router_pre_softmax=False`: top-k on logits, softmax over the k logits == renormalised top-k softmax
  (used when norm_topk_prob is true, the released model);
- `moe_router_pre_softmax=True`: softmax over all experts, then top-k, no renormalisation (norm_topk_prob false).
Only `gating` is replaced: mcore 0.16.1's `router_gating_linear` references `te_general_gemm` (NameError without
TE) and moves CPU weights to CUDA. Ours is a plain `F.linear` in the router dtype (fp32 by default).
The aux loss (`moe_aux_loss_coeff` = HF `router_aux_loss_coef`, load balancing type `aux_loss`) is mcore's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.transformer.moe.router import TopKRouter


class SoftmaxTopKRouter(TopKRouter):
    def gating(self, input: torch.Tensor) -> torch.Tensor:
        router_dtype = input.dtype
        if self.config.moe_router_dtype == "fp32":
            router_dtype = torch.float32
        elif self.config.moe_router_dtype == "fp64":
            router_dtype = torch.float64
        bias = self.bias.to(router_dtype) if self.bias is not None else None
        return F.linear(input.to(router_dtype), self.weight.to(router_dtype), bias)
