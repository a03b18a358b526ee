"""Training is the same computation at every parallel layout.

* On CPU the model-parallel / expert RNG streams are real forks of the (CPU-backed) tracker, as on GPU.
* (slow, torchrun, gloo, fp32) The first step's loss and EVERY parameter's gradient, gathered to full HF-named tensors
  through the mapping, equal across tp1 / tp2+sp / ep2 / tp2+ep2 / pp2, towers and deepstack included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")


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


def _global_batch(hf_dir, out_dir):
    """4 packed micro-batches with image, audio, video and text conversations (different label-token counts, so a
    mean of per-micro-batch means would differ from the token mean)."""
    from train_helpers import encode_demo_samples, packed_micro_batches

    rows = [["image_audio", "text"], ["video"], ["text", "text", "image_audio"], ["text"]]
    return packed_micro_batches(encode_demo_samples(hf_dir, out_dir), rows, pad_to_multiple=16)


@pytest.mark.slow
def test_gradients_equal_across_layouts(tiny_hf_dir, tmp_path):
    batches = _global_batch(tiny_hf_dir, tmp_path / "demo")
    assert len({b.num_trained for b in batches}) > 1
    torch.save(batches, tmp_path / "batches.pt")
    out = tmp_path / "layouts.json"
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(REPO / "tests/dist/train_layout_grads.py"), str(tiny_hf_dir), str(tmp_path / "batches.pt"),
                    str(out)], check=True, cwd=REPO, env=dict(env, OMP_NUM_THREADS="1"), timeout=1500)
    results = json.loads(out.read_text())
    reference = results.pop("tp1_dp2")
    print(f"reference tp1 (dp2): loss {reference['loss']:.7f} over {reference['num_tokens']} label tokens, aux per "
          f"layer {reference['aux']}, {reference['tensors']} gradient tensors")
    for name, r in results.items():
        print(f"{name}: loss rel {r['loss_rel']:.1e}, aux rel {r['aux_rel']:.1e}, worst gradient rel "
              f"{r['grad_worst_rel']:.1e} ({r['grad_worst']}), max abs {r['max_abs']:.1e}")
    assert set(results) == {"tp2_sp", "ep2_dp2", "tp2_ep2_sp", "pp2"}
    for name, r in results.items():
        assert r["num_tokens"] == reference["num_tokens"], name
        assert r["loss_rel"] <= 1e-5 and r["aux_rel"] <= 1e-5, (name, r)
        assert r["grad_worst_rel"] <= 1e-5, (name, r)
        assert r["tensors"] == reference["tensors"] and r["towers_nonzero"], name
