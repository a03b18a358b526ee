"""The data pipeline's batches drive the Megatron-Core thinker: a packed row (THD, cu_seqlens, media of several
conversations concatenated, positions restarting) gives the same logits as the same conversations in a padded
micro-batch, and micro-batches without any image or audio run too."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def encoded(tiny_hf_dir, tmp_path_factory):
    from omni_model.data.demo import generate_demo
    from omni_model.data.encoder import OmniEncoder, media_from_paths
    from omni_model.data.formats import LIST_KEY, load_raw

    records, _, _ = load_raw(generate_demo(tmp_path_factory.mktemp("demo"), 24, seed=5))
    encoder = OmniEncoder(tiny_hf_dir, max_seq_len=2048)

    def first(predicate):
        for record in records:
            if predicate({kind: len(record.get(key, [])) for kind, key in LIST_KEY.items()}):
                try:
                    return encoder.encode(record, media_from_paths(record))
                except Exception:  # noqa: BLE001 - a deliberately broken demo sample: take the next one
                    continue
        raise AssertionError("the demo set has no such sample")

    return {
        "image_audio": first(lambda n: n["image"] and n["audio"]),
        "video": first(lambda n: n["video"]),
        "text": first(lambda n: not any(n.values())),
        "pad_id": encoder.pad_id,
    }


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
    from megatron.core.packed_seq_params import PackedSeqParams

    packed = None
    if batch.cu_seqlens is not None:
        cu = batch.cu_seqlens.to(torch.int32)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=batch.max_seqlen, max_seqlen_kv=batch.max_seqlen)
    with torch.no_grad():
        return thinker(
            input_ids=batch.input_ids, position_ids=batch.position_ids, packed_seq_params=packed,
            pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
            pixel_values_videos=batch.pixel_values_videos, video_grid_thw=batch.video_grid_thw,
            input_features=batch.input_features, feature_attention_mask=batch.feature_attention_mask)


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


def test_micro_batch_without_image_or_audio(thinker, encoded):
    from omni_model.data.batch import collate

    batch = collate([encoded["text"], encoded["video"]], pad_id=encoded["pad_id"], packed=False)
    assert batch.pixel_values is None and batch.input_features is None
    logits = _logits(thinker, batch)
    assert logits.shape[:2] == batch.input_ids.shape and torch.isfinite(logits).all()
