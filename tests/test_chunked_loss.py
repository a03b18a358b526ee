"""The LM loss over token chunks (model.chunked_loss, train.loss_chunk_tokens) is the unchunked loss: the tiny
checkpoint's LLM on a packed row of three text sequences (ignore labels included), per-token loss and the gradient of
every parameter with chunks of 16 logit rows vs the whole row through mcore's own _postprocess (fp32, 1e-6 relative),
in one process and at tp2 with sequence parallelism (2 gloo ranks: vocab-parallel logits, the output layer's
all-gather of each chunk, the cross-entropy's all-reduces). The chunked path really runs: the output layer is called
once per chunk in the forward and once more per chunk in the backward (the recomputation). Context parallelism and
pipeline parallelism with chunks: tests/dist/cp_layout_grads.py (cp2, cp2+tp2+sp, cp2+ep2, cp2+pp2 chunked == cp1
unchunked)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from llm_helpers import config_of, packed_text_row
from spawn_ranks import spawn_on_free_port

LENGTHS = [37, 50, 13]  # 100 tokens: 7 chunks of 16 (the last one short)
CHUNK = 16


def _labels(ids: torch.Tensor) -> torch.Tensor:
    labels = torch.roll(ids, -1, dims=1)
    labels[:, ::7] = -100  # ignore labels: not trained
    return labels


def _step(model, ids, pos, psp, chunk_tokens: int) -> tuple:
    """Per-token loss [1, T] and every parameter's gradient of sum(loss * mask * weight)."""
    model.zero_grad(set_to_none=True)
    model.loss_chunk_tokens = chunk_tokens
    labels = _labels(ids)
    loss = model(input_ids=ids, position_ids=pos, packed_seq_params=psp, labels=labels)
    weight = torch.linspace(0.5, 1.5, loss.shape[1])[None] * (labels >= 0)
    (loss * weight).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach() * (labels >= 0), grads


def _worst(chunked: tuple, whole: tuple) -> dict:
    loss_c, grads_c = chunked
    loss_w, grads_w = whole
    assert set(grads_c) == set(grads_w)
    rel = {name: float((grads_c[name] - g).abs().max() / g.abs().max().clamp_min(1e-30)) for name, g in grads_w.items()
           if g.abs().max() > 0}
    worst = max(rel, key=rel.get)
    return {"loss": float((loss_c - loss_w).abs().max() / loss_w.abs().max()), "grad": rel[worst], "grad_name": worst,
            "tensors": len(grads_w), "zero": len(grads_w) - len(rel)}


def _compare_on_this_rank(hf_dir, tp: int) -> dict:
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.language_model import build_language_model
    from omni_model.runtime.parallel import init_parallel

    init_parallel(tp=tp)
    model = build_language_model(config_of(hf_dir), dtype=torch.float32, use_te=False)
    load_hf_into_model(model, hf_dir)
    ids, pos, psp = packed_text_row(LENGTHS, seed=3)
    calls = []
    model.output_layer.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    whole = _step(model, ids, pos, psp, chunk_tokens=0)
    whole_calls, calls[:] = list(calls), []
    chunked = _step(model, ids, pos, psp, chunk_tokens=CHUNK)
    return dict(_worst(chunked, whole), whole_calls=whole_calls, chunk_calls=list(calls),
                sequence_parallel=bool(model.output_layer.sequence_parallel))


def _chunks_called(calls: list, tp: int) -> bool:
    """The output layer ran on each chunk of this rank's (SP shard of the) row in order, then once more on each in
    the backward (the recomputation, in autograd's order: last chunk first)."""
    local = sum(LENGTHS) // tp
    rows = CHUNK // tp
    chunks = [min(rows, local - start) for start in range(0, local, rows)]
    return calls[:len(chunks)] == chunks and sorted(calls[len(chunks):]) == sorted(chunks)


def test_chunked_loss_equals_the_whole_row_loss(tiny_hf_dir):
    from omni_model.runtime.parallel import destroy_parallel

    try:
        result = _compare_on_this_rank(tiny_hf_dir, tp=1)
    finally:
        destroy_parallel()
    print(f"tp1: chunked vs whole loss rel {result['loss']:.1e}, worst gradient rel {result['grad']:.1e} "
          f"({result['grad_name']}) over {result['tensors']} tensors")
    assert result["whole_calls"] == [sum(LENGTHS)]
    assert _chunks_called(result["chunk_calls"], tp=1) and len(result["chunk_calls"]) == 2 * math.ceil(100 / CHUNK)
    assert result["zero"] == 0  # every parameter has a gradient: the comparison covers them all
    assert result["loss"] <= 1e-6 and result["grad"] <= 1e-6, result


def _tp2_worker(rank, port, hf_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from omni_model.runtime.parallel import destroy_parallel

    out[rank] = _compare_on_this_rank(hf_dir, tp=2)
    destroy_parallel()


@pytest.mark.slow
def test_chunked_loss_at_tp2_with_sequence_parallelism(tiny_hf_dir):
    out = mp.Manager().dict()
    spawn_on_free_port(_tp2_worker, (str(tiny_hf_dir), out))
    for rank in range(2):
        result = out[rank]
        print(f"tp2+sp rank {rank}: chunked vs whole loss rel {result['loss']:.1e}, worst gradient rel "
              f"{result['grad']:.1e} ({result['grad_name']}) over {result['tensors']} tensors")
        assert result["sequence_parallel"]
        assert result["whole_calls"] == [sum(LENGTHS) // 2]
        assert _chunks_called(result["chunk_calls"], tp=2)
        assert result["zero"] == 0
        assert result["loss"] <= 1e-6 and result["grad"] <= 1e-6, result
