"""No transformer layer reads a device value back to the host (bench/host_syncs.py's counter, on CPU): on a GPU each
such read stalls the host once per layer and micro-batch, which made the vision tower's RoPE (mcore's THD loop: one
`.item()` per image frame) and the LLM's a host-bound crawl. Checked on a packed image + audio + video + text
micro-batch through forward and backward; and the counter must see the syncs of mcore's THD RoPE when the packing
goes to it unchanged (what the towers did before)."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO
from train_helpers import ddp_thinker, encode_demo_samples, forward_backward, packed_micro_batches

sys.path.insert(0, str(REPO / "bench"))


@pytest.fixture(scope="module")
def packed_batch(tiny_hf_dir, tmp_path_factory):
    """One packed row: an image + audio sample, a video sample and a text sample."""
    encoded = encode_demo_samples(tiny_hf_dir, tmp_path_factory.mktemp("demo"))
    return packed_micro_batches(encoded, [["image_audio", "video", "text"]])[0]


@pytest.fixture(scope="module")
def setup(tiny_hf_dir, packed_batch):
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.thinker import build_thinker
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    thinker = build_thinker(tiny_hf_dir, config_overrides={"calculate_per_token_loss": True})
    load_hf_into_model(thinker, tiny_hf_dir, prefix="")
    return ddp_thinker(thinker.train()), packed_batch


def _syncs_in_layers(model, batch):
    from host_syncs import HostSyncCounter

    with HostSyncCounter() as syncs:
        forward_backward(model, [batch])
    return syncs


def test_no_host_sync_inside_any_layer(setup):
    model, batch = setup
    syncs = _syncs_in_layers(model, batch)
    print(f"{syncs.total} host reads in the step, inside layers: {dict(syncs.in_layers)}")
    assert syncs.total > 0  # the merge of media into the sequence reads counts: the counter is live
    assert not syncs.in_layers, syncs.in_layers


def test_mcores_thd_rope_would_be_seen(setup, monkeypatch):
    from omni_model.model import encoder_layers

    model, batch = setup
    monkeypatch.setattr(encoder_layers, "per_token_rope_packing", lambda packed: packed)  # towers on mcore's THD path
    monkeypatch.setattr(model.module.language_model, "per_token_rope", False)
    syncs = _syncs_in_layers(model, batch)
    assert any("rope_utils" in where for where in syncs.in_layers), syncs.in_layers


@pytest.mark.gpu
def test_a_gpu_training_step_syncs_a_few_times_not_per_parameter(tiny_hf_dir, packed_batch, tmp_path):
    """The whole optimizer step on CUDA (bf16, distributed optimizer, fused Adam, grad-norm clipping) under torch's
    sync debug mode: mcore's no-Apex grad norm alone used to sync once per parameter (151 here)."""
    import warnings

    import torch
    from train_throughput import build_ours_step

    batch = packed_batch
    spec = {"variant": "base", "device": "cuda", "warmup": 1, "steps": 2, "global_batch": 2, "micro_batch": 1,
            "seq_len": batch.input_ids.shape[1], "work": str(tmp_path), "hf_dir": str(tiny_hf_dir), "profile": ""}
    step = build_ours_step(spec, [batch] * 6, peak=1.0)
    step()  # the first step creates the optimizer state
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    trained = sum(1 for p in step.model.parameters() if p.requires_grad)
    print(f"{len(syncs)} host syncs in one step of 2 micro-batches, {trained} trained parameter tensors")
    # H200, session 5: 92 (~40 per micro-batch: the media merge, the batch's lengths, the loss; bench/host_syncs.py
    # lists them on CPU); a per-parameter read-back (mcore's no-Apex grad norm) adds one per trained tensor
    assert len(syncs) < trained
