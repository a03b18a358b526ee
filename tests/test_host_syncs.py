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


def test_the_merge_counts_placeholders_on_the_hosts_copy_of_the_ids(setup):
    """The training step hands the thinker its input ids twice: on the device for the embedding and the merge's
    masks, and on the host (`host_input_ids`, kept there by to_device) for the placeholder counts, which the merge
    checks against the towers' outputs: counted on the device they were three host reads per micro-batch, each
    waiting for every queued kernel. The count must be the host copy's: a host copy one image placeholder short
    is the mismatch the error names, though the device ids are whole."""
    from omni_model.model.thinker import PlaceholderMismatch
    from omni_model.train.forward_step import HOST_KEYS, thinker_inputs

    model, batch = setup
    thinker = model.module
    inputs = thinker_inputs(batch)
    assert "host_input_ids" in HOST_KEYS and inputs["host_input_ids"].device.type == "cpu"
    host = inputs["host_input_ids"].clone()
    first = int((host.reshape(-1) == thinker.image_token_id).nonzero()[0])
    host.view(-1)[first] = 0  # one image placeholder short, on the host copy only
    n_images = int((inputs["input_ids"] == thinker.image_token_id).sum())
    with pytest.raises(PlaceholderMismatch, match=rf"image: the input has {n_images - 1} <image pad> tokens but the "
                                                 rf"image encoder produced {n_images} embeddings"):
        thinker(**{**inputs, "host_input_ids": host})


@pytest.mark.gpu
def test_the_multimodal_forward_never_waits_for_the_gpu(tiny_hf_dir, packed_batch, monkeypatch):
    """The thinker's forward on a packed image + audio + video + text micro-batch, as the training step moves it
    (to_device), under torch's sync debug mode set to error: no read-back and no blocking host-to-device copy in the
    towers, the merge or the language model (a sync there waits for every queued kernel, e.g. the previous
    micro-batch's backward, and the GPU then idles while the host launches the towers: ~240-300 ms of the H100's
    multimodal step was such idle, bench/RESULTS.md issue 27)."""
    import torch

    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.thinker import build_thinker
    from omni_model.runtime.parallel import init_parallel
    from omni_model.train.forward_step import thinker_inputs, to_device

    init_parallel()
    thinker = build_thinker(tiny_hf_dir, dtype=torch.bfloat16)
    load_hf_into_model(thinker, tiny_hf_dir, prefix="")
    device = next(thinker.parameters()).device
    assert device.type == "cuda"
    inputs = to_device(thinker_inputs(packed_batch.pin_memory()), device)
    with torch.no_grad():
        thinker(**inputs)  # warm-up: first-call work (cuBLAS handles, kernels' lazy loading) may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            thinker(**inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    # the bench's `syncs=on` variant (the same-run baseline of the syncs' removal) brings them back: the check can fail
    from omni_model.model import audio, vision
    from omni_model.train import forward_step
    from train_throughput import restore_host_syncs

    for module, name in ((audio, "host_to_device"), (vision, "host_to_device"), (forward_step, "HOST_KEYS")):
        monkeypatch.setattr(module, name, getattr(module, name))  # undone after the test
    restore_host_syncs()
    inputs = to_device(thinker_inputs(packed_batch.pin_memory()), device)
    with torch.no_grad(), pytest.raises(RuntimeError, match="synchroniz"):
        torch.cuda.set_sync_debug_mode("error")
        try:
            thinker(**inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_the_merges_scatter_has_torchs_values_and_gradients():
    """thinker._MaskedScatter (features' gradient gathered at `nonzero_static` rows of the host-known count, where
    torch's masked_scatter backward reads the count back) against torch's masked_scatter: values and both
    gradients equal bit for bit."""
    import torch

    from omni_model.model.thinker import _MaskedScatter

    torch.manual_seed(0)
    embeds = torch.randn(2, 7, 5, requires_grad=True)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 2:4] = mask[1, 0] = mask[1, 5] = True
    features = torch.randn(int(mask.sum()), 5, requires_grad=True)
    weight = torch.randn(2, 7, 5)
    full = mask[..., None].expand_as(embeds)
    ours = _MaskedScatter.apply(embeds, full, features, int(mask.sum()))
    (ours * weight).sum().backward()
    ours_grads = embeds.grad.clone(), features.grad.clone()
    embeds.grad = features.grad = None
    theirs = embeds.masked_scatter(full, features)
    (theirs * weight).sum().backward()
    assert torch.equal(ours, theirs)
    assert torch.equal(ours_grads[0], embeds.grad) and torch.equal(ours_grads[1], features.grad)
    assert features.grad.abs().sum() > 0 and (embeds.grad[mask] == 0).all()
