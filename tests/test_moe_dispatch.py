"""The sync-free allgather dispatcher (dispatcher.py) against mcore's own, and no host syncs in a packed LLM pass.

The static dispatcher must give the same numbers as mcore's MoEAllGatherTokenDispatcher to the last bit (logits and
every gradient, fp32), and a packed forward + backward of the LLM (local spec, EP 1) must not run any op that reads a
size or a value back from the device (on GPU each is a host sync that stalls the launch queue): `.item()`,
`nonzero`, `masked_select`, boolean indexing. Found by a TorchDispatchMode on CPU; `Tensor.tolist()` and `.cpu()`
do not dispatch on a CPU tensor and are not seen here.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llm_helpers import on_device_of, packed_text_row, tiny_language_model

warnings.filterwarnings("ignore")

LENGTHS = (7, 5, 9)
SYNCING_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
               "aten.repeat_interleave.Tensor", "aten.bincount.default", "aten._unique2.default",
               "aten.is_nonzero.default", "aten.equal.default"}


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return tiny_language_model(tiny_hf_dir)


def packed_inputs(m) -> dict:
    """The LLM's keyword inputs for one packed row of LENGTHS, on the model's device."""
    ids, pos, psp = on_device_of(m, *packed_text_row(LENGTHS, seed=40))
    return dict(input_ids=ids, position_ids=pos, packed_seq_params=psp,
                padding_mask=torch.zeros_like(ids, dtype=torch.bool))


def dispatchers(m):
    return [layer.mlp.token_dispatcher for layer in m.decoder.layers]


def run(m, dispatcher: str):
    """Logits and grads of one packed pass with every layer's dispatcher of class `dispatcher`: "mcore" (mcore's
    own), "static" (sync-free permutation, mcore's combine) or "gather" (the default: also the gathered slot sums)."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

    from omni_model.model.dispatcher import GatherCombineTokenDispatcher, StaticAllGatherTokenDispatcher

    classes = {"mcore": MoEAllGatherTokenDispatcher, "static": StaticAllGatherTokenDispatcher,
               "gather": GatherCombineTokenDispatcher}
    for d in dispatchers(m):
        d.__class__ = classes[dispatcher]
    m.zero_grad(set_to_none=True)
    try:
        logits = m(**packed_inputs(m))
        logits.square().mean().backward()
    finally:
        for d in dispatchers(m):
            d.__class__ = GatherCombineTokenDispatcher
    return logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_local_spec_uses_the_gather_combine_dispatcher(model):
    from omni_model.model.dispatcher import GatherCombineTokenDispatcher

    assert all(type(d) is GatherCombineTokenDispatcher for d in dispatchers(model))


def test_static_dispatch_bit_identical_to_mcore(model):
    mcore_logits, mcore_grads = run(model, "mcore")
    ours_logits, ours_grads = run(model, "static")
    assert torch.equal(ours_logits, mcore_logits)
    router = [n for n in mcore_grads if "router" in n]
    assert router and mcore_grads.keys() == ours_grads.keys()
    for name, grad in mcore_grads.items():
        assert torch.equal(ours_grads[name], grad), name


def test_gathered_slot_sums_match_mcore_to_fp32_rounding(model):
    """The default dispatcher sums each token's k slots in another order than mcore's scatter_add_ (fp32 here):
    logits and every gradient (router, experts, attention, embedding) equal to fp32 rounding."""
    mcore_logits, mcore_grads = run(model, "mcore")
    ours_logits, ours_grads = run(model, "gather")
    torch.testing.assert_close(ours_logits, mcore_logits, rtol=1e-5, atol=1e-6)
    assert mcore_grads.keys() == ours_grads.keys()
    for name, grad in mcore_grads.items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert (ours_grads[name] - grad).abs().max() <= 1e-5 * scale, name


def _routing(num_tokens: int, num_experts: int, k: int, seed: int):
    """A random top-k routing map and the slot list the static dispatcher makes of it (expert-major)."""
    g = torch.Generator().manual_seed(seed)
    top = torch.rand(num_tokens, num_experts, generator=g).topk(k, dim=1).indices
    routing = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter_(1, top, True)
    slots = torch.nonzero_static(routing.T.contiguous(), size=num_tokens * k)
    return slots[:, 1], torch.sort(slots[:, 1], stable=True).indices.view(num_tokens, k)


def test_slot_gather_and_sum_are_the_dispatch_and_combine_with_their_gradients():
    """_GatherSlots / _SumSlots against torch's index_select and a scatter_add_ into zeros (mcore's unpermute), in
    float64: values, and gradients by torch.autograd.gradcheck."""
    from omni_model.model.dispatcher import _GatherSlots, _SumSlots

    token, slot_of = _routing(num_tokens=11, num_experts=6, k=3, seed=0)
    hidden = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(33, 4, dtype=torch.float64, requires_grad=True)
    assert torch.equal(_GatherSlots.apply(hidden, token, slot_of), hidden.index_select(0, token))
    reference = torch.zeros(11, 4, dtype=torch.float64).scatter_add_(0, token[:, None].expand(-1, 4), rows)
    torch.testing.assert_close(_SumSlots.apply(rows, slot_of, token), reference, rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(lambda h: _GatherSlots.apply(h, token, slot_of), (hidden,))
    assert torch.autograd.gradcheck(lambda r: _SumSlots.apply(r, slot_of, token), (rows,))


def test_bf16_slot_sums_round_once():
    """In bf16 each token's sum is rounded once (fp32 accumulation inside the reduction): within half a bf16 ulp
    (2^-8 relative) of the float64 sum, which a sum rounded after every add (bf16 atomics, mcore's scatter_add_ on
    the GPU) misses (checked on the same rows: a sequential bf16 sum is off by more)."""
    from omni_model.model.dispatcher import _SumSlots

    token, slot_of = _routing(num_tokens=512, num_experts=16, k=8, seed=1)
    rows = torch.randn(512 * 8, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    exact = torch.zeros(512, 64, dtype=torch.float64).index_add_(0, token, rows.double())
    within_half_ulp = lambda summed: bool(((summed.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-30).all())
    assert within_half_ulp(_SumSlots.apply(rows, slot_of, token))
    by_token = rows.index_select(0, slot_of.reshape(-1)).view(512, 8, 64)
    rounded_each_add = by_token[:, 0].clone()
    for k in range(1, 8):
        rounded_each_add = rounded_each_add + by_token[:, k]
    assert not within_half_ulp(rounded_each_add)
