"""bench/train_throughput.py trains transformers' thinker on the same packed rows as ours: its inputs must keep the
packed sequences apart (transformers builds the block-causal mask from the text position row, and only without a
KV cache). Each sequence's logits in the packed row == the sequence alone."""

from __future__ import annotations

import sys
import warnings

import torch

from conftest import REPO
from llm_helpers import text_batch

sys.path.insert(0, str(REPO / "bench"))
warnings.filterwarnings("ignore")

LENGTHS = (6, 9, 1, 5)


def packed_text_batch():
    from omni_model.data.batch import OmniBatch

    parts = [text_batch(b=1, s=n, seed=30 + i) for i, n in enumerate(LENGTHS)]
    ids = torch.cat([p[0] for p in parts], 1)
    pos = torch.cat([p[1] for p in parts], 2).float()
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    labels = ids.clone()
    return OmniBatch(input_ids=ids, labels=labels, shift_labels=labels, loss_mask=torch.ones_like(ids).float(),
                     attention_mask=torch.ones_like(ids), position_ids=pos, cu_seqlens=cu, max_seqlen=max(LENGTHS),
                     num_tokens=ids.numel(), num_trained=ids.numel()), parts


def test_text_positions_restart_per_sequence():
    from train_throughput import text_positions

    cu = torch.tensor([0, 3, 4, 7], dtype=torch.int32)
    assert text_positions(cu, 7).tolist() == [0, 1, 2, 0, 0, 1, 2]


def test_hf_packed_rows_equal_each_sequence_alone(tiny_hf_dir):
    from train_throughput import build_hf, hf_inputs

    torch.manual_seed(0)
    model = build_hf(str(tiny_hf_dir), "sdpa", "cpu").eval()
    for module in model.modules():  # the exact per-expert loop (llm_helpers.hf_thinker says why)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = "eager"
    batch, parts = packed_text_batch()
    with torch.no_grad():
        packed = model(**hf_inputs(batch, "cpu")).logits[0]
        start = 0
        for ids, pos in parts:
            alone = model(input_ids=ids, position_ids=pos.float()).logits[0]
            end = start + ids.shape[1]
            assert (packed[start:end] - alone).abs().max() < 1e-5, (start, end)
            start = end
        # the same inputs with transformers' default KV cache attend across sequences: the test can fail
        inputs = dict(hf_inputs(batch, "cpu"), use_cache=True)
        assert (model(**inputs).logits[0] - packed).abs().max() > 1e-3


def test_flex_attention_keeps_packed_sequences_apart_too(tiny_hf_dir):
    """The flex_attention rows take the same inputs (text row + 3 MRoPE rows, no mask): transformers builds a
    BlockMask from the text row. Forward only (torch 2.13 has no flex backward on CPU); compared with the sdpa path,
    which the test above holds to each sequence alone."""
    from train_throughput import build_hf, hf_inputs

    torch.manual_seed(0)
    model = build_hf(str(tiny_hf_dir), "sdpa", "cpu").eval()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = "eager"
    batch, _ = packed_text_batch()
    with torch.no_grad():
        sdpa = model(**hf_inputs(batch, "cpu")).logits[0]
        model.config.text_config._attn_implementation = "flex_attention"  # as build_hf sets it
        flex = model(**hf_inputs(batch, "cpu")).logits[0]
        # one causal sequence over the whole row instead: the mask matters, so the comparison can fail
        whole = model(input_ids=batch.input_ids, use_cache=False).logits[0]
    assert (flex - sdpa).abs().max() < 1e-5
    assert (whole - sdpa).abs().max() > 1e-3
