"""The sync-free EP=1 dispatcher gives mcore's allgather dispatcher's outputs and gradients (tiny LLM, CPU fp32)."""

from __future__ import annotations

import torch

from llm_helpers import config_of, text_batch


def _loss_and_grads(model, ids, pos):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, position_ids=pos)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_sync_free_dispatcher_equals_mcore_allgather(tiny_hf_dir):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.dispatcher import SyncFreeAllGatherDispatcher
    from omni_model.model.language_model import build_language_model
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    model = build_language_model(config_of(tiny_hf_dir))
    load_hf_into_model(model, tiny_hf_dir)
    moe_layers = [layer.mlp for layer in model.decoder.layers]
    assert all(isinstance(m.token_dispatcher, SyncFreeAllGatherDispatcher) for m in moe_layers)
    ids, pos = text_batch(b=2, s=24)
    ours, our_grads = _loss_and_grads(model, ids, pos)

    for moe in moe_layers:  # mcore's own dispatcher, same weights
        moe.token_dispatcher = MoEAllGatherTokenDispatcher(
            moe.num_local_experts, moe.local_expert_indices, config=moe.config,
            pg_collection=get_default_pg_collection())
    reference, ref_grads = _loss_and_grads(model, ids, pos)

    assert (ours - reference).abs().max().item() <= 1e-6
    assert our_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert torch.allclose(our_grads[name], grad, atol=1e-7, rtol=1e-5), name
