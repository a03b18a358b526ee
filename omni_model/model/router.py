"""mcore's TopKRouter with the aux loss weighted by the micro-batch's routed-token count on every TP x CP rank.

In per-token-loss mode mcore 0.19 attaches `aux_loss * local_num_tokens * tp_cp_size` to the router activations
(`attach_and_log_load_balancing_loss`), with `local_num_tokens` the non-padding tokens of this rank's sequence shard:
that equals the micro-batch's count only when every shard holds as many non-padding tokens. With sequence
parallelism the padding sits in the last shard, so the ranks weighted the same aux loss differently and the router
gradients at tp2+sp differed from tp1 by up to 100 % (tests/test_train_layouts.py). mcore 0.16 used the count summed
over TP x CP on every rank (its per-expert counts were all-reduced in place); this router hands that sum, divided by
tp_cp_size, as `valid_token_count`, so that `local_num_tokens * tp_cp_size` is the micro-batch's routed-token count
on every rank again (the objective in train/forward_step.py). The rest is mcore's `_apply_aux_loss`.
"""

from __future__ import annotations

from megatron.core.transformer.moe.moe_utils import (
    get_tokens_per_expert_and_token_count,
    switch_load_balancing_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter


class OmniTopKRouter(TopKRouter):
    def _apply_aux_loss(self, probs, scores_for_aux_loss, routing_map, with_padding_mask: bool = False):
        aux_loss_coeff = self.get_aux_loss_coeff("aux_loss")
        if aux_loss_coeff == 0:
            return probs
        global_tokens_per_expert, _, total_num_tokens = get_tokens_per_expert_and_token_count(
            routing_map=routing_map, reduce_group=self.tp_cp_group, topk=self.topk,
            with_padding_mask=with_padding_mask)
        aux_loss = switch_load_balancing_loss_func(
            probs=scores_for_aux_loss, tokens_per_expert=global_tokens_per_expert, total_num_tokens=total_num_tokens,
            topk=self.topk, num_experts=self.config.num_moe_experts, moe_aux_loss_coeff=aux_loss_coeff,
            fused=self.config.moe_router_fusion)
        return self.attach_and_log_load_balancing_loss(
            probs, aux_loss_coeff, aux_loss, "load_balancing_loss", self.tp_cp_group,
            valid_token_count=total_num_tokens / self.tp_cp_group.size())
