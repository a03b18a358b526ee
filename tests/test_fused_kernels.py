"""model.fused_kernels: the Triton RMSNorm, SwiGLU-with-probs and RoPE kernels, forward and backward, against
independent references: transformers' own `Qwen3OmniMoeThinkerTextRMSNorm` module, mcore's unfused TEGroupedMLP
activation with probs (chunk, silu, product, times the probs, cast back; megatron.core.transformer.moe.experts), and
mcore's unfused RoPE on the same angles (rope_utils._apply_rotary_pos_emb_bshd).

On this CPU machine the kernels run under Triton's interpreter, in a process of its own (tests/fused_kernel_checks.py
with `TRITON_INTERPRET=1`, which must be set before triton is first imported): the kernels' indexing, masking (rows
and columns that do not fill a tile) and maths are checked in fp32, tightly. In bf16 the interpreter truncates where
the GPU rounds to nearest, so bf16 is checked within a few units in the last place here, and tightly on the GPU
(`-m gpu`, at the 30B-A3B shapes), where the switch is also checked end to end (the thinker's loss and gradients with
the kernels on and off).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import REPO

warnings.filterwarnings("ignore")

FP32 = 2e-6  # max |got - reference| / max |reference|, fp32
BF16_INTERPRETED = 2e-2  # bf16 under the interpreter (truncating casts): a few bf16 ulps
BF16_GPU = 8e-3  # bf16 on the GPU: one bf16 ulp (2^-8 relative) plus the fp32 sum order


@pytest.fixture(scope="module")
def interpreted():
    """Every case's (output, input grad, second grad) relative errors, the kernels run by Triton's interpreter."""
    from omni_model.model import fused_kernels

    if not fused_kernels.available():
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(REPO / "tests" / "fused_kernel_checks.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype, tolerance", [("float32", FP32), ("bfloat16", BF16_INTERPRETED)])
@pytest.mark.parametrize("part", ["norm", "swiglu", "rotary"])
def test_the_kernels_equal_the_references(interpreted, part, dtype, tolerance):
    """fp32: equal to rounding; bf16: within the interpreter's truncating casts (the GPU's are tested below)."""
    cases = {case: errors for case, errors in interpreted[part].items() if case.endswith(dtype)}
    assert len(cases) >= 3
    for case, errors in cases.items():
        assert max(errors) < tolerance, (part, case, errors)


def test_a_wrong_kernel_is_caught(interpreted):
    """The checks above can fail: a norm whose mean runs over one column fewer is far outside them; the routing prob
    scales the whole SwiGLU gradient (prob 0.5 gives half of prob 1's)."""
    assert interpreted["mutants"]["short_mean"] > 1e-3
    assert interpreted["mutants"]["prob_scales_grad"] < FP32


def test_empty_inputs_and_a_column_of_probs(interpreted):
    """A micro-batch whose tokens all go to other ranks' experts gives empty inputs; mcore's dispatchers may hand the
    probs as a [rows, 1] column: the gradient comes back in the shape it was given."""
    assert interpreted["edges"] == {"empty_norm": [0, 64], "empty_norm_grad": [0, 64], "column_probs_grad": [6, 1],
                                    "column_equals_flat": True}


def test_the_layers_take_the_kernels_only_on_cuda():
    """On CPU tensors the modules run torch's ops (the kernels are CUDA's; the interpreter is for the tests): a CPU
    RMSNorm with the switch on equals the one with it off bit for bit."""
    from omni_model.model.norm import RMSNorm

    norm = RMSNorm(hidden_size=64, eps=1e-6)
    x = torch.randn(3, 64)
    on = norm(x)
    norm.fused = False
    assert torch.equal(on, norm(x))


# -- on the GPU -------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8192, 2048), (8192, 32, 128), (8192, 4, 128), (37, 200)], ids=str)
def test_rms_norm_on_the_gpu_at_the_30b_shapes(shape):
    from fused_kernel_checks import _norm_errors
    from omni_model.model import fused_kernels

    errors = _norm_errors(fused_kernels, shape, torch.bfloat16, device="cuda")
    print(f"rms_norm {shape} bf16: output / dx / dweight relative error {errors}")
    assert max(errors) < BF16_GPU, errors


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(65536, 768), (1000, 100)], ids=str)
def test_swiglu_with_probs_on_the_gpu_at_the_30b_shapes(shape):
    from fused_kernel_checks import _swiglu_errors
    from omni_model.model import fused_kernels

    errors = _swiglu_errors(fused_kernels, *shape, torch.bfloat16, device="cuda")
    print(f"swiglu_with_probs {shape} bf16: output / dfc1 / dprobs relative error {errors}")
    assert max(errors) < BF16_GPU, errors


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8192, 1, 32, 128), (8192, 1, 4, 128), (5000, 1, 16, 80)], ids=str)
def test_rotary_on_the_gpu_at_the_30b_shapes(shape):
    """The forward keeps mcore's roundings: bit-equal in bf16 on the GPU, where casts round to nearest."""
    from fused_kernel_checks import _rotary_errors
    from omni_model.model import fused_kernels

    errors = _rotary_errors(fused_kernels, shape, torch.bfloat16, device="cuda")
    print(f"rotary {shape} bf16: output / dx relative error {errors}")
    assert errors[0] == 0.0 and errors[1] < BF16_GPU, errors


@pytest.mark.gpu
def test_the_language_model_trains_alike_with_the_kernels_on_and_off(tiny_hf_dir):
    """The language model's token losses and every gradient with the kernels' switches (and the LLM's RoPE tables) on
    against off (bf16, CUDA, the tiny model's weights). Its logits against transformers' with the kernels on: tests/test_llm_gpu.py (defaults)."""
    from fused_kernel_checks import _relative
    from llm_helpers import config_of, text_batch
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.language_model import build_language_model
    from omni_model.model.options import PerfOptions, apply_options
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    model = build_language_model(config_of(tiny_hf_dir), dtype=torch.bfloat16)
    load_hf_into_model(model, tiny_hf_dir)
    model = model.cuda().eval()  # eval: no aux-loss attachment outside mcore's schedule; the backward is the same
    ids, pos = (t.cuda() for t in text_batch(b=2, s=128))
    results = []
    for fused in (True, False):
        apply_options(model, PerfOptions(fused_rms_norm=fused, fused_swiglu=fused, fused_rope=fused,
                                         llm_rope_tables=fused))
        model.zero_grad()
        losses = model(input_ids=ids, position_ids=pos, labels=torch.roll(ids, -1, 1)).float()
        losses.mean().backward()
        results.append((losses.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                          if p.grad is not None}))
    (on, on_grads), (off, off_grads) = results
    worst = max(_relative(on_grads[n], off_grads[n]) for n in off_grads)
    print(f"token losses fused vs torch: max difference {(on - off).abs().max().item():.3e}; worst gradient "
          f"relative error {worst:.2e} over {len(off_grads)} parameters")
    assert on_grads.keys() == off_grads.keys() and len(off_grads) > 10
    assert (on - off).abs().max().item() < 5e-2 and worst < 5e-2
