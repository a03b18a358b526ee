"""A token dispatcher without host syncs for MoE layers whose experts are all local (EP = 1).

mcore 0.16's allgather dispatcher permutes with `masked_select` and moves the per-expert counts to the host
(`.cpu()`): three device-to-host syncs per MoE layer and pass, each draining the launch queue. With every expert on
this rank, each token has exactly top-k entries in the routing map, so the permutation has a static size and is one
stable argsort on the device. The order is mcore's (expert-major, tokens ascending within an expert), so results are
those of `moe_utils.permute`/`unpermute`. With EP > 1 the counts per rank vary: mcore's code path is kept.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher


class SyncFreeAllGatherDispatcher(MoEAllGatherTokenDispatcher):
    def dispatch_postprocess(self, hidden_states, probs):
        if self.ep_size > 1:
            return super().dispatch_postprocess(hidden_states, probs)
        self.hidden_shape_before_permute = hidden_states.shape
        routing_map = self.routing_map  # [tokens, experts], exactly top-k True per row
        num_tokens = routing_map.shape[0]
        expert_major = routing_map.T.reshape(-1)  # entry e * T + t
        order = torch.argsort(expert_major.to(torch.int8), descending=True, stable=True)
        order = order[: num_tokens * self.router_topk]  # the True entries, expert-major, tokens ascending
        self.sorted_token_indices = order % num_tokens
        permuted_hidden = hidden_states.index_select(0, self.sorted_token_indices)
        self.local_probs = probs.T.reshape(-1).index_select(0, order)
        tokens_per_expert = routing_map.sum(dim=0)  # stays on the device
        self.routing_map = None
        return permuted_hidden, tokens_per_expert, self.local_probs

    def combine_preprocess(self, hidden_states):
        if self.ep_size > 1:
            return super().combine_preprocess(hidden_states)
        out = hidden_states.new_zeros(self.hidden_shape_before_permute)
        return out.index_add(0, self.sorted_token_indices, hidden_states)


class OmniMoELayer(MoELayer):
    """mcore's MoELayer with the sync-free dispatcher where it applies (allgather, EP = 1)."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules, layer_number=layer_number, pg_collection=pg_collection)
        if config.moe_token_dispatcher_type == "allgather" and config.expert_model_parallel_size == 1:
            self.token_dispatcher = SyncFreeAllGatherDispatcher(
                self.num_local_experts, self.local_expert_indices, config=self.config, pg_collection=pg_collection)
