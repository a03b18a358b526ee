"""Context parallelism on our packed attention (omni_model.model.context_parallel), without TransformerEngine.

* The zig-zag plan: every rank's tokens together are each token once, chunks r and 2cp-1-r of every sequence, the key
  prefixes are the causal ones; the per-sequence padding keeps real tokens, labels and positions in place.
* Attention: the CP attention of each rank's chunks (K/V gathered from every rank's share, bottom-right causal
  prefixes) equals full-row packed attention, forward and input gradients (single process, gathering simulated).
* (slow, torchrun x4, gloo, fp32) loss, aux loss and every gradient at cp2, cp2+tp2+sp, cp2+ep2 and cp2+pp2 equal cp1
  on packed rows mixing a 30-second audio, videos and short text conversations; the cp layouts take the LM loss over
  token chunks (train.loss_chunk_tokens), the cp1 reference over whole micro-batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def test_zigzag_plan_covers_each_token_once_in_mcore_order():
    from omni_model.model.context_parallel import zigzag_plan

    cu = [0, 8, 12, 28]  # sequences of 8, 4, 16 tokens; cp 2 -> chunks of 2, 1, 4
    plans = [zigzag_plan(cu, 2, r) for r in range(2)]
    assert plans[0].local_index.tolist() == [0, 1, 6, 7, 8, 11, 12, 13, 14, 15, 24, 25, 26, 27]
    assert plans[1].local_index.tolist() == [2, 3, 4, 5, 9, 10, 16, 17, 18, 19, 20, 21, 22, 23]
    assert sorted(np.concatenate([p.local_index for p in plans]).tolist()) == list(range(28))
    # rank 1's chunks of the first sequence: global [2, 4) and [4, 6), key prefixes [0, 4) and [0, 6)
    assert plans[1].cu_q.tolist() == [0, 2, 4, 5, 6, 10, 14]
    assert plans[1].cu_kv.tolist() == [0, 4, 10, 12, 15, 23, 35]
    gathered = np.concatenate([p.local_index for p in plans])  # rank-major, as the all-gather lays them out
    assert gathered[plans[1].kv_index[:10]].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]


def test_sequences_must_split_into_2cp_chunks():
    from omni_model.model.context_parallel import zigzag_plan

    with pytest.raises(ValueError, match="does not split into 2 x cp = 4 chunks"):
        zigzag_plan([0, 6, 9], 2, 0)


def _packed_batch(lengths, pad_id=7):
    from omni_model.data.batch import EncodedSample, collate

    rng = np.random.default_rng(0)
    samples = []
    for i, n in enumerate(lengths):
        labels = rng.integers(0, 100, n)
        labels[: n // 2] = -100
        samples.append(EncodedSample(__key__=f"s{i}", __restore_key__=(), __subflavors__={}, __sources__=(),
                                     sample_ids=[f"s{i}"], input_ids=rng.integers(10, 100, n), labels=labels,
                                     position_ids=np.tile(np.arange(n, dtype=np.float32), (3, 1)), seq_lens=[n]))
    from omni_model.data.packing import pack

    return collate([pack(samples)], pad_id=pad_id, packed=True)


def test_padding_keeps_every_real_token_in_place_within_its_sequence():
    from omni_model.data.packing import pad_for_context_parallel

    batch = _packed_batch([5, 3, 5])
    padded = pad_for_context_parallel(batch, cp=2, tp=2)
    assert padded.cu_seqlens.tolist() == [0, 8, 12, 20, 24]  # 8, 4, 8, then 4 more: a multiple of 2 x cp x tp
    starts, real = [0, 8, 12], [5, 3, 5]
    for (a, n), (b, _) in zip(zip([0, 5, 8], real), zip(starts, real)):
        assert torch.equal(padded.input_ids[0, b:b + n], batch.input_ids[0, a:a + n])
        assert torch.equal(padded.shift_labels[0, b:b + n], batch.shift_labels[0, a:a + n])
        assert torch.equal(padded.position_ids[:, 0, b:b + n], batch.position_ids[:, 0, a:a + n])
    pads = padded.attention_mask[0] == 0
    assert int(pads.sum()) == 24 - 13 and (padded.input_ids[0][pads] == 7).all()
    assert (padded.loss_mask[0][pads] == 0).all() and padded.loss_mask.sum() == batch.loss_mask.sum()


@pytest.mark.parametrize("cp", [2, 3])
def test_cp_attention_equals_full_packed_attention(cp):
    """Each rank's queries against the keys laid out from every rank's share equal the full-row attention; so do
    the gradients of the queries and of the (gathered) keys and values."""
    from omni_model.model.attention import packed_attention
    from omni_model.model.context_parallel import zigzag_plan

    torch.manual_seed(0)
    lengths = [12 * cp, 4 * cp, 2 * cp]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    total, heads, groups, dim = int(cu[-1]), 4, 2, 8
    q, k, v = (torch.randn(total, n, dim, dtype=torch.float64, requires_grad=True) for n in (heads, groups, groups))
    full = packed_attention(q, k, v, cu, cu, max(lengths), max(lengths), scale=dim ** -0.5, causal=True,
                            kernel="loop")
    weight = torch.randn_like(full)
    grads_full = torch.autograd.grad((full * weight).sum(), (q, k, v))

    plans = [zigzag_plan(cu.tolist(), cp, r) for r in range(cp)]
    gathered_index = torch.from_numpy(np.concatenate([p.local_index for p in plans]))
    grads_cp = [torch.zeros_like(t) for t in (q, k, v)]
    for plan in plans:
        k_all, v_all = k[gathered_index], v[gathered_index]  # what the all-gather gives every rank
        local = torch.from_numpy(plan.local_index)
        index = torch.from_numpy(plan.kv_index)
        out = packed_attention(q[local], k_all[index], v_all[index], torch.from_numpy(plan.cu_q),
                               torch.from_numpy(plan.cu_kv), plan.max_q, plan.max_kv, scale=dim ** -0.5,
                               causal=True, kernel="loop")
        torch.testing.assert_close(out, full[local], rtol=1e-12, atol=1e-12)
        for acc, g in zip(grads_cp, torch.autograd.grad((out * weight[local]).sum(), (q, k, v))):
            acc += g
    for got, want in zip(grads_cp, grads_full):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def cp_global_batch(hf_dir, out_dir):
    """4 packed micro-batches: a 30-second audio with a video and a text conversation, then rows of video, image +
    audio and text conversations (odd lengths: the CP padding is exercised)."""
    from train_helpers import encode_demo_samples, encode_long_audio_sample, packed_micro_batches

    samples = encode_demo_samples(hf_dir, out_dir)
    samples["long_audio"] = encode_long_audio_sample(hf_dir, out_dir / "long", seconds=30.0)
    rows = [["long_audio", "video", "text"], ["video", "text", "text"], ["image_audio", "text"], ["text", "video"]]
    return packed_micro_batches(samples, rows)


@pytest.mark.slow
def test_gradients_equal_at_context_parallel_layouts(tiny_hf_dir, tmp_path):
    batches = cp_global_batch(tiny_hf_dir, tmp_path / "demo")
    assert batches[0].input_ids.shape[1] > 400 and batches[0].video_grid_thw is not None
    torch.save(batches, tmp_path / "batches.pt")
    out = tmp_path / "cp_layouts.json"
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                    str(REPO / "tests/dist/cp_layout_grads.py"), str(tiny_hf_dir), str(tmp_path / "batches.pt"),
                    str(out)], check=True, cwd=REPO, env=dict(env, OMP_NUM_THREADS="1"), timeout=1500)
    results = json.loads(out.read_text())
    reference = results.pop("cp1_dp4")
    print(f"reference cp1 (dp4): loss {reference['loss']:.7f} over {reference['num_tokens']} label tokens, "
          f"{reference['tensors']} gradient tensors")
    for name, r in results.items():
        print(f"{name}: loss rel {r['loss_rel']:.1e}, aux rel {r['aux_rel']:.1e}, worst gradient rel "
              f"{r['grad_worst_rel']:.1e} ({r['grad_worst']}), max abs {r['max_abs']:.1e}")
    assert set(results) == {"cp2_dp2", "cp2_tp2_sp", "cp2_ep2_dp2", "cp2_pp2"}
    for name, r in results.items():
        assert r["num_tokens"] == reference["num_tokens"], name
        assert r["loss_rel"] <= 1e-5 and r["aux_rel"] <= 1e-5, (name, r)
        assert r["grad_worst_rel"] <= 1e-5, (name, r)
        assert r["tensors"] == reference["tensors"] and r["towers_nonzero"], name
