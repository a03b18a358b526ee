"""mcore's allgather token dispatcher without host syncs when every expert is local (EP = 1, no token dropping).

mcore's (0.16 to 0.19) `MoEAllGatherTokenDispatcher.dispatch_postprocess` syncs the host three times per MoE layer
and pass:
`tokens_per_expert.cpu()` (TE's grouped GEMM wants a host list) and two `masked_select`s (output size read back from
the device) in the permutation of the tokens and of their routing probabilities. With all experts on this rank and no
capacity factor, every token goes to exactly top-k experts: the permuted length is tokens x top-k, known on the host.
`torch.nonzero_static` of the expert-major routing map then gives the same (expert, token) pairs in the same order as
mcore's masked_select (experts ascending, tokens ascending within each), so the permutation, the permuted
probabilities and their gradients are the same numbers (tests/test_moe_dispatch.py); the token counts stay on the
device, which our grouped GEMM takes (experts.GroupedGemmExperts).

`GatherCombineTokenDispatcher` (the default where the static one applies) also takes the atomics out of the two
places where a token's k expert slots are summed: the combine's forward (mcore's unpermute: a zeroed buffer and a
`scatter_add_` of the slots, atomic adds in bf16) and the dispatch's backward (index_select's backward, an atomic
`index_add_`). Both become a gather of each token's k slots (their slot numbers, token-major, from a stable sort
of the slots' tokens) summed with fp32 accumulation; each one's backward is the other's forward gather. Deterministic,
no zeroed buffer, and each token's sum is rounded to bf16 once instead of after every add (on the H100's text
step, index_add_ + scatter_add_ were ~13 ms: bench/RESULTS.md issue 27).

`OmniMoELayer` is mcore's MoELayer using these dispatchers where they apply (otherwise mcore's own, unchanged).
`PerfOptions(static_dispatch=False)` keeps mcore's own, `gather_combine=False` the static dispatcher with mcore's
combine (benchmark switches).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

from .options import DEFAULT


class StaticAllGatherTokenDispatcher(MoEAllGatherTokenDispatcher):
    """Allgather dispatcher for all-local experts: permutation with sizes known on the host."""

    def dispatch_postprocess(self, hidden_states, probs):
        self.hidden_shape_before_permute = hidden_states.shape
        routing_map = self.routing_map  # [tokens, experts], exactly top-k True per row
        num_tokens, num_experts = routing_map.shape
        slots = torch.nonzero_static(routing_map.T.contiguous(), size=num_tokens * self.router_topk)
        expert, token = slots[:, 0], slots[:, 1]
        self.local_map = routing_map
        self.reversed_local_input_permutation_mapping = token
        self.local_probs = probs.T.contiguous().view(-1).index_select(0, expert * num_tokens + token)
        self.routing_map = None
        tokens_per_expert = routing_map.sum(dim=0)  # on the device
        return self._permute(hidden_states, token), tokens_per_expert, self.local_probs

    def _permute(self, hidden_states, token):
        return hidden_states.index_select(0, token)


def _sum_slots(rows: torch.Tensor, slot_of: torch.Tensor) -> torch.Tensor:
    """[tokens x k, H] slot rows -> [tokens, H]: each token's k rows (`slot_of` [tokens, k]) summed (fp32
    accumulation inside the reduction, one rounding to the rows' dtype)."""
    num_tokens, k = slot_of.shape
    return rows.index_select(0, slot_of.reshape(-1)).view(num_tokens, k, -1).sum(1)


class _GatherSlots(torch.autograd.Function):
    """The dispatch: slot i gets token[i]'s row. Backward: each token's k slot gradients gathered and summed (what
    index_select's backward does with an atomic index_add_)."""

    @staticmethod
    def forward(ctx, hidden, token, slot_of):
        ctx.save_for_backward(slot_of)
        return hidden.index_select(0, token)

    @staticmethod
    def backward(ctx, grad):
        (slot_of,) = ctx.saved_tensors
        return _sum_slots(grad, slot_of), None, None


class _SumSlots(torch.autograd.Function):
    """The combine: each token's k expert outputs summed (what mcore's unpermute does with a scatter_add_ into a
    zeroed buffer). Backward: slot i gets token[i]'s gradient row."""

    @staticmethod
    def forward(ctx, rows, slot_of, token):
        ctx.save_for_backward(token)
        return _sum_slots(rows, slot_of)

    @staticmethod
    def backward(ctx, grad):
        (token,) = ctx.saved_tensors
        return grad.index_select(0, token), None, None


class GatherCombineTokenDispatcher(StaticAllGatherTokenDispatcher):
    """The static dispatcher whose slot sums (combine forward, dispatch backward) are gathers, not atomic adds."""

    def _permute(self, hidden_states, token):
        # slots are expert-major with tokens ascending: a stable sort by token lists each token's k slots, experts
        # ascending (exactly k per token: every token routes to top-k experts)
        self.slot_of = torch.sort(token, stable=True).indices.view(hidden_states.shape[0], -1)
        return _GatherSlots.apply(hidden_states, token, self.slot_of)

    def combine_preprocess(self, hidden_states):
        combined = _SumSlots.apply(hidden_states, self.slot_of, self.reversed_local_input_permutation_mapping)
        self.slot_of = None
        return combined.view(self.hidden_shape_before_permute)


class OmniMoELayer(MoELayer):
    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, **kwargs):
        # kwargs: what mcore's builder adds (0.19: is_mtp_layer, name), handed on unchanged
        super().__init__(config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection,
                         **kwargs)
        config = self.config
        self.static_applies = (type(self.token_dispatcher) is MoEAllGatherTokenDispatcher
                               and self.num_local_experts == config.num_moe_experts
                               and config.moe_expert_capacity_factor is None and not config.moe_permute_fusion)
        self.use_options(DEFAULT)

    def use_options(self, options) -> None:
        # the subclass only overrides a method (no state of its own): same object, same process groups
        if self.static_applies:
            static = (GatherCombineTokenDispatcher if options.gather_combine else StaticAllGatherTokenDispatcher)
            self.token_dispatcher.__class__ = static if options.static_dispatch else MoEAllGatherTokenDispatcher
