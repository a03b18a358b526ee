"""Training is the same computation at every parallel layout.

* On CPU the model-parallel / expert RNG streams are real forks of the (CPU-backed) tracker, as on GPU.
* (slow, torchrun, gloo, fp32) The first step's loss and EVERY parameter's gradient, gathered to full HF-named tensors
  through the mapping, equal across tp1 / tp2+sp / ep2 / tp2+ep2 / pp2, towers and deepstack included.
"""

from __future__ import annotations

import torch


def _draw(n: int = 4) -> torch.Tensor:
    return torch.rand(n)


def test_cpu_rng_tracker_is_initialised_and_forks():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
    from megatron.core.tensor_parallel.random import get_expert_parallel_rng_tracker_name

    from omni_model.runtime.parallel import init_parallel

    init_parallel(seed=1234)
    tracker = get_cuda_rng_tracker()
    assert tracker.is_initialized()
    expert = get_expert_parallel_rng_tracker_name()

    torch.manual_seed(0)
    plain = torch.cat([_draw(), _draw()])
    torch.manual_seed(0)
    first = _draw()
    with tracker.fork(expert):
        forked_a = _draw()
    with tracker.fork(expert):
        forked_b = _draw()
    second = _draw()
    # the default stream continues as if no fork happened; the forked stream is another one and advances
    assert torch.equal(torch.cat([first, second]), plain)
    assert not torch.equal(forked_a, first) and not torch.equal(forked_a, forked_b)

    def expert_draw(ep_rank: int) -> torch.Tensor:
        model_parallel_cuda_manual_seed(1234, tp_rank=0, ep_rank=ep_rank, etp_rank=0)
        with get_cuda_rng_tracker().fork(expert):
            return _draw()

    # each expert-parallel rank initialises its experts from its own stream, reproducibly
    assert torch.equal(expert_draw(0), forked_a)
    assert not torch.equal(expert_draw(1), forked_a)
    model_parallel_cuda_manual_seed(1234)  # leave the tracker as init_parallel made it
