"""model.linear: at one TP rank the towers' and the LLM's linears are torch's own matmul, with mcore's numbers.

The reference is mcore's Column/RowParallelLinear itself (its Python autograd Function), with the same weights:
outputs and every gradient agree to fp32 rounding. The TP>1 paths (mcore's Function, with its all-reduce) are covered
by the layout and encoder TP-parity tests (test_train_layouts, test_vision_encoder), which compare every gradient.
"""

from __future__ import annotations

import pytest
import torch

from encoder_parity_utils import hf_config_dict, vision_inputs

MCORE_FUNCTION = "LinearWithGradAccumulationAndAsyncCommunicationBackward"


@pytest.fixture(scope="module")
def config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from omni_model.runtime.parallel import init_parallel

    init_parallel(tp=1)
    return TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True)


def _grad_fn_names(output: torch.Tensor) -> set[str]:
    """Every autograd node behind `output`."""
    names, stack, seen = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _run(layer, x):
    """Output, output bias and the gradients of input, weight and bias after a backward of a fixed random cotangent."""
    x = x.detach().clone().requires_grad_(True)
    out, out_bias = layer(x)
    biased = out + out_bias if out_bias is not None else out  # what the caller (bias-dropout-add) does
    biased.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    grads = (x.grad, layer.weight.grad, layer.bias.grad if layer.bias is not None else None)
    return out, out_bias, grads


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("skip_bias_add", [False, True])
def test_equals_mcores_linear_and_skips_its_python_backward(config, kind, skip_bias_add):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from omni_model.model import linear

    ours_cls, theirs_cls = ((linear.LocalColumnParallelLinear, ColumnParallelLinear) if kind == "column"
                            else (linear.LocalRowParallelLinear, RowParallelLinear))
    extra = {"gather_output": False} if kind == "column" else {"input_is_parallel": True}
    build = dict(config=config, init_method=torch.nn.init.normal_, bias=True, skip_bias_add=skip_bias_add, **extra)
    ours, theirs = ours_cls(16, 24, **build), theirs_cls(16, 24, **build)
    with torch.no_grad():
        for p in (*ours.parameters(), *theirs.parameters()):  # mcore inits the bias to zero: give it values
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(0))

    out, out_bias, grads = _run(ours, x)
    ref, ref_bias, ref_grads = _run(theirs, x)
    assert (ref_bias is None) == (not skip_bias_add)
    # at one TP rank a bias mcore hands back is added inside ours' matmul: the caller gets None and adds nothing
    assert out_bias is None
    biased_ref = ref + ref_bias if ref_bias is not None else ref
    assert (out - biased_ref).abs().max() < 1e-6
    for ours_grad, ref_grad in zip(grads, ref_grads):
        assert ref_grad is not None and (ours_grad - ref_grad).abs().max() < 1e-5
    assert MCORE_FUNCTION in _grad_fn_names(ref)
    assert MCORE_FUNCTION not in _grad_fn_names(out)


def test_switch_restores_mcores_function(config):
    from omni_model.model import linear
    from omni_model.model.options import PerfOptions, apply_options

    layer = linear.LocalColumnParallelLinear(16, 8, config=config, init_method=torch.nn.init.normal_, bias=False,
                                             gather_output=False)
    apply_options(layer, PerfOptions(plain_matmul_when_local=False))
    out, _ = layer(torch.randn(2, 1, 16, requires_grad=True))
    assert MCORE_FUNCTION in _grad_fn_names(out)
    apply_options(layer, PerfOptions())
    assert MCORE_FUNCTION not in _grad_fn_names(layer(torch.randn(2, 1, 16, requires_grad=True))[0])


def test_a_handed_back_bias_stays_mcores_when_the_caller_fuses_it_or_the_switch_is_off(config):
    """bias_activation_fusion (the MLP's fused bias + GeLU wants the bias), bias=after or linear=mcore: mcore's
    (output, bias)."""
    import dataclasses

    from omni_model.model import linear
    from omni_model.model.options import PerfOptions, apply_options

    build = dict(init_method=torch.nn.init.normal_, bias=True, skip_bias_add=True, gather_output=False)
    fused = linear.LocalColumnParallelLinear(16, 8, config=dataclasses.replace(config, bias_activation_fusion=True),
                                             **build)
    plain = apply_options(linear.LocalColumnParallelLinear(16, 8, config=config, **build),
                          PerfOptions(plain_matmul_when_local=False))
    after = apply_options(linear.LocalColumnParallelLinear(16, 8, config=config, **build),
                          PerfOptions(bias_in_matmul=False))
    for layer in (fused, plain, after):
        out, bias = layer(torch.randn(2, 1, 16))
        assert bias is layer.bias


@pytest.mark.parametrize("flag", ["gradient_accumulation_fusion", "allreduce_dgrad", "sequence_parallel"])
def test_communication_or_fusion_keeps_mcores_function(flag):
    """Any of mcore's backward duties (TP all-reduce of the input grad, sequence parallelism, fused wgrad
    accumulation) means its Function runs."""
    from omni_model.model.linear import only_a_matmul

    assert only_a_matmul(tp_group=None, wgrad_deferral_limit=None)
    assert not only_a_matmul(**{flag: True})
    assert not only_a_matmul(grad_output_buffer=[])


def test_vision_tower_backward_has_no_mcore_linear_function(config, tiny_hf_dir):
    """The tower's ~4 linears per layer (what makes the H200 multimodal step host-bound) are C++ autograd nodes."""
    from omni_model.model.vision import VisionEncoder

    tower = VisionEncoder(hf_config_dict(tiny_hf_dir))
    pixels, grid = vision_inputs([[1, 4, 6]])
    embeds, deepstack = tower(pixels, grid)
    names = _grad_fn_names(embeds + sum(d.sum() for d in deepstack))
    assert "MmBackward0" in names or "AddmmBackward0" in names
    assert MCORE_FUNCTION not in names
