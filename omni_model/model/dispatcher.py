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

`OmniMoELayer` is mcore's MoELayer using this dispatcher where it applies (otherwise mcore's own, unchanged).
`PerfOptions(static_dispatch=False)` keeps mcore's own (a benchmark switch).
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
        return hidden_states.index_select(0, token), tokens_per_expert, self.local_probs


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
            static = options.static_dispatch
            self.token_dispatcher.__class__ = StaticAllGatherTokenDispatcher if static else MoEAllGatherTokenDispatcher
