"""GPU: context-parallel attention through torch's flash varlen kernel (omni_model.model.attention) — a CP rank's
query chunks against their causal key prefixes (fewer queries than keys) must be masked BOTTOM-RIGHT aligned, as the
exact per-sequence loop does with its explicit mask; and the CP layout of every rank must give full-row attention.

    python -m pytest -q tests/test_context_parallel_gpu.py      # on a CUDA machine (skipped on CPU)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("cp", [2, 4])
def test_varlen_kernel_takes_cp_chunks_bottom_right_like_the_loop(cp):
    from omni_model.model.attention import packed_attention, varlen_applies
    from omni_model.model.context_parallel import zigzag_plan

    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.bfloat16
    lengths = [512 * cp, 128 * cp, 32 * cp, 2 * cp]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    total, heads, groups, dim = int(cu[-1]), 32, 4, 128
    q, k, v = (torch.randn(total, n, dim, device=device, dtype=dtype) for n in (heads, groups, groups))
    assert varlen_applies(q, "auto")
    full = packed_attention(q, k, v, cu.to(device), cu.to(device), max(lengths), max(lengths), scale=dim ** -0.5,
                            causal=True, kernel="auto")
    plans = [zigzag_plan(cu.tolist(), cp, r) for r in range(cp)]
    gathered = torch.from_numpy(np.concatenate([p.local_index for p in plans])).to(device)
    k_all, v_all = k[gathered], v[gathered]
    worst = 0.0
    for plan in plans:
        local, index = (torch.from_numpy(a).to(device) for a in (plan.local_index, plan.kv_index))
        args = (q[local], k_all[index], v_all[index], torch.from_numpy(plan.cu_q).to(device),
                torch.from_numpy(plan.cu_kv).to(device), plan.max_q, plan.max_kv)
        flash = packed_attention(*args, scale=dim ** -0.5, causal=True, kernel="auto")
        loop = packed_attention(*(t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in args),
                                scale=dim ** -0.5, causal=True, kernel="loop")
        worst = max(worst, (flash.float() - loop).abs().max().item())
        torch.testing.assert_close(flash.float(), loop, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(flash, full[local], rtol=2e-2, atol=2e-2)
    print(f"cp{cp}: varlen vs exact loop worst abs {worst:.2e}")
