"""The data pipeline's batches drive the Megatron-Core thinker: a packed row (THD, cu_seqlens, media of several
conversations concatenated, positions restarting) gives the same logits as the same conversations in a padded
micro-batch, and micro-batches without any image or audio run too."""

from __future__ import annotations

import pytest
import torch

from train_helpers import encode_demo_samples, packed_micro_batches


@pytest.fixture(scope="module")
def encoded(tiny_hf_dir, tmp_path_factory):
    return encode_demo_samples(tiny_hf_dir, tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def thinker(tiny_hf_dir):
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.thinker import build_thinker
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    model = build_thinker(tiny_hf_dir).eval()
    load_hf_into_model(model, tiny_hf_dir, prefix="")
    return model


def _logits(thinker, batch):
    from omni_model.train.forward_step import thinker_inputs

    inputs = thinker_inputs(batch)
    inputs.pop("labels"), inputs.pop("loss_mask")  # logits, not the per-token loss
    with torch.no_grad():
        logits = thinker(**inputs)
    return logits.view(*batch.input_ids.shape, -1)  # a packed batch runs as one [1, B*S] THD row


def test_packed_row_equals_padded_batch(thinker, encoded):
    from omni_model.data.batch import collate
    from omni_model.data.packing import pack

    samples = [encoded["image_audio"], encoded["video"], encoded["text"]]
    padded = _logits(thinker, collate(samples, pad_id=encoded["pad_id"], packed=False))
    row = collate([pack(samples)], pad_id=encoded["pad_id"], packed=True)
    packed = _logits(thinker, row)
    start, worst = 0, 0.0
    for index, sample in enumerate(samples):
        n = sample.length
        worst = max(worst, (packed[0, start:start + n] - padded[index, :n]).abs().max().item())
        start += n
    print(f"packed row vs padded batch: max abs logit error {worst:.2e} over {start} tokens")
    assert worst <= 1e-4


def test_adapter_conventions(encoded):
    """thinker_inputs gives mcore's meanings: shifted labels, padding mask True on pads, THD packing of B*S."""
    from omni_model.data.batch import collate
    from omni_model.data.packing import pack
    from omni_model.train.forward_step import thinker_inputs

    padded = collate([encoded["text"], encoded["video"]], pad_id=encoded["pad_id"], packed=False)
    inputs = thinker_inputs(padded)
    assert inputs["packed_seq_params"] is None
    assert torch.equal(inputs["labels"], padded.shift_labels)
    assert torch.equal(inputs["padding_mask"], padded.attention_mask == 0) and inputs["padding_mask"].any()
    assert "attention_mask" not in inputs and "pixel_values_videos" in inputs
    assert "pixel_values_videos" not in thinker_inputs(padded, media=False)
    rows = [pack([encoded["text"], encoded["video"]]), pack([encoded["image_audio"]])]
    packed = collate(rows, pad_id=encoded["pad_id"], packed=True)
    inputs = thinker_inputs(packed)
    n = packed.input_ids.numel()
    assert inputs["input_ids"].shape == (1, n) and inputs["position_ids"].shape == (3, 1, n)
    psp = inputs["packed_seq_params"]
    assert psp.qkv_format == "thd" and int(psp.cu_seqlens_q[-1]) == n and psp.max_seqlen_q == packed.max_seqlen
    # always a padding mask, also when nothing is padded (mcore's aux-loss token count depends on it, see forward_step)
    unpadded = thinker_inputs(collate([pack([encoded["text"]])], pad_id=encoded["pad_id"], packed=True))
    assert unpadded["padding_mask"] is not None and not unpadded["padding_mask"].any()


def test_forward_rejects_unknown_keywords(thinker, encoded):
    """transformers' keywords (HF attention_mask) are an error on the mcore thinker, not silently dropped."""
    from omni_model.data.batch import collate

    batch = collate([encoded["text"]], pad_id=encoded["pad_id"], packed=False)
    with pytest.raises(TypeError, match="attention_mask"):
        thinker(**batch.hf_inputs())


def test_micro_batch_without_image_or_audio(thinker, encoded):
    from omni_model.data.batch import collate

    batch = collate([encoded["text"], encoded["video"]], pad_id=encoded["pad_id"], packed=False)
    assert batch.pixel_values is None and batch.input_features is None
    logits = _logits(thinker, batch)
    assert logits.shape[:2] == batch.input_ids.shape and torch.isfinite(logits).all()


def test_loader_pin_thread_reaches_every_tensor_of_a_batch(encoded, monkeypatch):
    """CPU: torch's pin_memory utility (what the DataLoader's pin thread calls) hands an OmniBatch to its own
    pin_memory, which pins each tensor field (recorded here; real pinning needs CUDA, the GPU test below)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    batch = packed_micro_batches(encoded, [["image_audio", "video", "text"]])[0]
    tensors = batch.tensors()
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(self) or self.clone())
    out = pin_memory(batch)
    assert type(out).__name__ == "OmniBatch" and len(pinned) == len(tensors) > 5
    assert all(torch.equal(getattr(out, name), value) for name, value in tensors.items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_loader_pins_batches(encoded):
    """torch's DataLoader pin thread (energon's loader has pin_memory=True) pins every tensor of an OmniBatch, so the
    step's `to(device, non_blocking=True)` is an asynchronous copy; a dataclass without `pin_memory` passed through
    unpinned."""
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = pin_memory(packed_micro_batches(encoded, [["image_audio", "video", "text"]])[0])
    tensors = pinned.tensors()
    assert {"input_ids", "pixel_values", "pixel_values_videos", "input_features"} <= set(tensors)
    assert all(value.is_pinned() for value in tensors.values()), [n for n, v in tensors.items() if not v.is_pinned()]
