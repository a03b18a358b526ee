"""Padding changes nothing a training step produces: the same micro-batch with extra right padding (unpacked), or with
a padding segment (packed THD row), gives the same loss, the same MoE aux (load-balancing) loss of every layer and
the same gradient of every parameter, through mcore's schedule, DDP and finalize_model_grads (fp32, CPU).

Pad tokens sit after every real token (causal attention: nothing real attends to them), carry no label, and are
kept out of MoE routing statistics by the padding mask (`forward_step.thinker_inputs` -> GPTModel's `padding_mask`).
Without that mask the pads would be counted in the aux loss and their embeddings would get its gradient.
"""

from __future__ import annotations

import pytest
import torch

from train_helpers import ddp_thinker, encode_demo_samples, forward_backward, gradients

AUX_COEFF = 0.1  # large enough that the aux loss gradient is visible next to the cross-entropy's
EXTRA_PAD = 37


@pytest.fixture(scope="module")
def encoded(tiny_hf_dir, tmp_path_factory):
    return encode_demo_samples(tiny_hf_dir, tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.thinker import build_thinker
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    thinker = build_thinker(tiny_hf_dir, config_overrides={"calculate_per_token_loss": True,
                                                           "moe_aux_loss_coeff": AUX_COEFF})
    load_hf_into_model(thinker, tiny_hf_dir, prefix="")
    return ddp_thinker(thinker.train())


def _step(model, batch):
    result = forward_backward(model, [batch])
    return result["loss"], result["aux"]["load_balancing_loss"], gradients(model)


def _compare(model, batch, padded, what):
    assert padded.input_ids.shape[1] > batch.input_ids.shape[1] and padded.num_tokens == batch.num_tokens
    loss, aux, grads = _step(model, batch)
    loss_p, aux_p, grads_p = _step(model, padded)
    worst_name, worst = None, 0.0
    for name, grad in grads.items():
        scale = grad.abs().max().item() or 1.0
        error = (grads_p[name] - grad).abs().max().item() / scale
        if error >= worst:
            worst_name, worst = name, error
    aux_error = (aux_p - aux).abs().max().item()
    print(f"{what}: loss {loss:.6f} vs {loss_p:.6f} (diff {abs(loss - loss_p):.1e}); aux per layer "
          f"{aux.tolist()} max diff {aux_error:.1e}; worst grad rel error {worst:.1e} ({worst_name}) "
          f"over {len(grads)} parameters")
    assert abs(loss - loss_p) <= 1e-6 * abs(loss)
    assert (aux > 0).all() and aux_error <= 1e-6 * aux.abs().max().item()
    assert worst <= 1e-5, worst_name
    return grads


def test_right_padding_changes_nothing(model, encoded):
    from omni_model.data.batch import collate

    samples = [encoded["text"], encoded["image_audio"]]
    batch = collate(samples, pad_id=encoded["pad_id"], packed=False)
    longest = batch.input_ids.shape[1]
    padded = collate(samples, pad_id=encoded["pad_id"], packed=False, pad_to_multiple=longest + EXTRA_PAD)
    grads = _compare(model, batch, padded, "right padding")
    assert all(grads[name].abs().sum() > 0 for name in grads if name.startswith(("vision_model", "audio_model")))


def test_packing_padding_segment_changes_nothing(model, encoded):
    from omni_model.data.batch import collate
    from omni_model.data.packing import pack

    row = pack([encoded["text"], encoded["video"]])
    batch = collate([row], pad_id=encoded["pad_id"], packed=True)
    padded = collate([row], pad_id=encoded["pad_id"], packed=True, pad_to_multiple=row.length + EXTRA_PAD)
    assert len(padded.cu_seqlens) == len(batch.cu_seqlens) + 1  # the padding is a segment of its own
    _compare(model, batch, padded, "packed padding segment")


def test_rows_in_one_micro_batch_equal_rows_as_micro_batches(tiny_hf_dir, encoded):
    """train.micro_batch_size > 1 with packing: two packed rows in one micro-batch (one THD row of 2*S tokens, the
    first row's padding a segment of its own) give the step's loss and every gradient of the same rows as two
    micro-batches. The MoE aux loss is per micro-batch by definition (its token shares are of the routed batch), so
    its coefficient is 0 here."""
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.data.batch import collate
    from omni_model.data.packing import pack
    from omni_model.model.thinker import build_thinker
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    thinker = build_thinker(tiny_hf_dir, config_overrides={"calculate_per_token_loss": True,
                                                           "moe_aux_loss_coeff": 0.0})
    load_hf_into_model(thinker, tiny_hf_dir, prefix="")
    model = ddp_thinker(thinker.train())
    rows = [pack([encoded["text"], encoded["video"]]), pack([encoded["image_audio"]])]
    pad = encoded["pad_id"]
    one = forward_backward(model, [collate(rows, pad_id=pad, packed=True)])
    grads_one = gradients(model)
    two = forward_backward(model, [collate([row], pad_id=pad, packed=True) for row in rows])
    grads_two = gradients(model)
    assert one["num_tokens"] == two["num_tokens"]
    assert abs(one["loss"] - two["loss"]) <= 1e-6 * abs(two["loss"]), (one["loss"], two["loss"])
    worst = max(((grads_one[n] - g).abs().max() / (g.abs().max() or 1.0)).item() for n, g in grads_two.items())
    print(f"one micro-batch of 2 rows vs 2 micro-batches: loss {one['loss']:.6f} vs {two['loss']:.6f}, "
          f"worst grad rel error {worst:.1e} over {len(grads_two)} parameters")
    assert worst <= 1e-5
