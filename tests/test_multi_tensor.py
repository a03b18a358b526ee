"""runtime.multi_tensor replaces mcore's pure-Python fallbacks of the Apex/TE multi-tensor kernels (the grad norm,
the scaled copy): the same numbers as mcore's own fallbacks, without reading each tensor back to the host (790
host syncs per step on the H200 before)."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))


@pytest.fixture(scope="module")
def tensors():
    from omni_model.runtime import cpu_patches

    cpu_patches.apply()  # mcore's fallbacks allocate on device="cuda"
    g = torch.Generator().manual_seed(0)
    shapes = [(7,), (33, 5), (128, 64), (1,), (3, 3, 3)]
    fp32 = [torch.randn(s, generator=g) * (i + 1) for i, s in enumerate(shapes)]
    return fp32, [t.bfloat16() for t in fp32]


def test_l2_norm_equals_mcores_fallback_bit_for_bit(tensors):
    """fp32 grads (what mcore's optimizers norm: fp32 main grads): bit-identical. bf16: mcore's fallback sums the
    squares in bf16 (272.0 for 272.92); ours in fp32."""
    from megatron.core.utils import local_multi_tensor_l2_norm

    from omni_model.runtime.multi_tensor import l2_norm

    fp32, bf16 = tensors
    ours, _ = l2_norm(2048 * 32, None, [fp32], False)
    theirs, _ = local_multi_tensor_l2_norm(2048 * 32, None, [fp32], False)
    assert ours.shape == theirs.shape == (1,) and ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs), (ours, theirs)
    for group in (fp32, bf16):
        exact = torch.cat([t.double().flatten() for t in group]).norm()
        ours, _ = l2_norm(2048 * 32, None, [group], False)
        theirs, _ = local_multi_tensor_l2_norm(2048 * 32, None, [group], False)
        assert abs(float(ours) - float(exact)) / float(exact) < 1e-5  # fp32 sums
        assert abs(float(ours) - float(exact)) <= abs(float(theirs) - float(exact))


@pytest.mark.parametrize("factor", [1.0, 0.37])
def test_scale_equals_mcores_fallback(tensors, factor):
    from megatron.core.utils import local_multi_tensor_scale

    from omni_model.runtime.multi_tensor import scale

    fp32, bf16 = tensors
    for sources, like in ((fp32, fp32), (fp32, bf16), (bf16, fp32)):
        ours = [torch.empty_like(t) for t in like]
        theirs = [torch.empty_like(t) for t in like]
        scale(2048 * 32, None, [sources, ours], factor)
        local_multi_tensor_scale(2048 * 32, None, [sources, theirs], factor)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
        in_place = [t.clone() for t in sources]  # clipping: sources and destinations are the same tensors
        scale(2048 * 32, None, [in_place, in_place], factor)
        theirs_in_place = [t.clone() for t in sources]
        local_multi_tensor_scale(2048 * 32, None, [theirs_in_place, theirs_in_place], factor)
        assert all(torch.equal(a, b) for a, b in zip(in_place, theirs_in_place))
    in_place = [t.clone() for t in fp32]
    scale(2048 * 32, None, [in_place, in_place], factor)  # clipping scales the grads in place
    assert all(torch.equal(a, b * factor) for a, b in zip(in_place, fp32))


def test_no_host_read_per_tensor(tensors):
    from host_syncs import HostSyncCounter
    from megatron.core.utils import local_multi_tensor_l2_norm

    from omni_model.runtime.multi_tensor import l2_norm

    fp32, _ = tensors
    with HostSyncCounter() as mcore:
        local_multi_tensor_l2_norm(2048 * 32, None, [fp32], False)
    with HostSyncCounter() as ours:
        l2_norm(2048 * 32, None, [fp32], False)
    assert mcore.total >= len(fp32)  # one read per tensor (+ the total): what the counter must see
    assert ours.total == 0, ours.by_line


def test_init_parallel_binds_them_into_mcores_optimizer():
    from megatron.core.optimizer import clip_grads, optimizer

    from omni_model.runtime import multi_tensor
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    assert clip_grads.l2_norm_impl is multi_tensor.l2_norm
    assert clip_grads.multi_tensor_scale_impl is multi_tensor.scale
    assert optimizer.multi_tensor_scale_impl is multi_tensor.scale
    grads = [torch.full((4,), 3.0), torch.full((9,), 4.0)]
    norm = clip_grads.get_grad_norm_fp32(grads, grad_stats_parallel_group=torch.distributed.group.WORLD)
    assert norm == pytest.approx((4 * 9 + 9 * 16) ** 0.5, rel=1e-6)
