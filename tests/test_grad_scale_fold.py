"""build.FoldedGradScale (the GPU's optimizer step): the 1/label-tokens scaling and the clip factor applied inside
fused Adam (its grad_scale) give the same training as mcore's own step, which multiplies the grad buffers by each.
Checked on the CPU with torch's fused AdamW (it takes a grad_scale on the CPU too): the real mcore training objects of
the tiny thinker, two steps on packed multimodal micro-batches, clipping engaged (norm above clip_grad) and not."""

from __future__ import annotations

import warnings

import pytest
import torch

from train_helpers import encode_demo_samples, packed_micro_batches


@pytest.fixture(scope="module")
def batches(tiny_hf_dir, tmp_path_factory):
    return packed_micro_batches(encode_demo_samples(tiny_hf_dir, tmp_path_factory.mktemp("demo")),
                                [["image_audio", "text"], ["video"]])


def _run(tiny_hf_dir, tmp_path, batches, fold: bool, clip_grad: float, gpu: bool = False):
    """The tiny thinker's real mcore training objects and a loop Run over the steps (a, b), (a, a), (b, b)."""
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.options import PerfOptions
    from omni_model.train import build
    from omni_model.train.data import TokenCounter
    from omni_model.train.forward_step import forward_step
    from omni_model.train.loop import Run
    from omni_model.train.metrics import FlopCounter
    from omni_model.train.settings import TrainSettings

    warnings.filterwarnings("ignore")
    a, b = batches  # the steps see (a, b), (a, a), (b, b): each a different label-token count, so 1/tokens differs
    settings = TrainSettings(hf_dir=str(tiny_hf_dir), init_checkpoint="", shards="", train_dir=str(tmp_path),
                             train=dict(iters=3, lr_warmup_iters=1, micro_batch_size=1, global_batch_size=2,
                                        clip_grad=clip_grad, lr=1e-3, seed=1234, gpus_per_node=int(gpu)))
    build.init_training_parallel(settings)
    # fold_grad_scale: what build_training does on the GPU (bf16, distributed optimizer, fused Adam)
    training = build.build_training(settings, load_initial_weights=False, options=PerfOptions(fold_grad_scale=fold))
    load_hf_into_model(training.thinker, tiny_hf_dir, prefix="")
    training.optimizer.reload_model_params()
    if not gpu:
        build.use_fused_adam(training.optimizer)  # as on the GPU; torch has it on the CPU too
        if fold:
            build.FoldedGradScale(training.model, training.optimizer)
    return Run(settings=settings, training=training, forward_step=forward_step, digest="", loader=None,
               batches=TokenCounter(iter([a, b, a, a, b, b])), evaluation=[], flops=FlopCounter(tiny_hf_dir),
               peak=None, log=None)


def _train(tiny_hf_dir, tmp_path, batches, fold: bool, clip_grad: float, gpu: bool = False):
    from omni_model.train.loop import step

    run = _run(tiny_hf_dir, tmp_path, batches, fold, clip_grad, gpu)
    thinker = run.training.thinker
    initial = {name: p.detach().clone() for name, p in thinker.named_parameters()}
    records = [step(run, i) for i in (1, 2, 3)]  # step 1 has lr 0 (warm-up); steps 2 and 3 update
    params = {name: p.detach().clone() for name, p in thinker.named_parameters()}
    assert max((initial[n] - p).abs().max().item() for n, p in params.items()) > 1e-4  # the weights did move
    return records, params


@pytest.mark.parametrize("clip_grad", [0.5, 1e6])
def test_folded_step_trains_like_mcores_step(tiny_hf_dir, tmp_path, batches, clip_grad):
    theirs, their_params = _train(tiny_hf_dir, tmp_path / "mcore", batches, fold=False, clip_grad=clip_grad)
    ours, our_params = _train(tiny_hf_dir, tmp_path / "fold", batches, fold=True, clip_grad=clip_grad)
    norms = [(r["grad_norm"], o["grad_norm"]) for r, o in zip(theirs, ours)]
    print(f"clip_grad {clip_grad}: grad norms (mcore, folded) {norms}, losses "
          f"{[(r['loss'], o['loss']) for r, o in zip(theirs, ours)]}")
    assert (theirs[0]["grad_norm"] > clip_grad) == (clip_grad < 1)  # the clip factor is exercised in one case only
    for (a, b) in norms:
        assert b == pytest.approx(a, rel=1e-5)
    assert theirs[2]["loss"] != theirs[0]["loss"]  # step 3 saw step 2's update
    assert ours[2]["loss"] == pytest.approx(theirs[2]["loss"], rel=1e-6)
    moved = max((their_params[n] - p).abs().max().item() for n, p in our_params.items())
    assert moved < 1e-6, moved


def test_a_nan_gradient_stops_the_folded_step_before_any_parameter_moves(tiny_hf_dir, tmp_path, batches):
    """The fold turns DDP's per-bucket NaN check off (its norms cost 4.1 ms of an H100 step): its own step must then
    refuse a non-finite grad norm, with a message, and leave every parameter and Adam state as it was."""
    from omni_model.train import build
    from omni_model.train.loop import step

    run = _run(tiny_hf_dir, tmp_path, batches, fold=True, clip_grad=1.0)
    training = run.training
    assert training.model.ddp_config.check_for_nan_in_grad is False
    name = "language_model.decoder.layers.0.self_attention.linear_proj.weight"
    params = dict(training.thinker.named_parameters())
    with torch.no_grad():
        params[name][0, 0] = float("nan")  # one NaN weight: the loss and every grad below it follow
    before = {n: p.detach().clone() for n, p in params.items()}
    with pytest.raises(build.NonFiniteGradError, match=r"the gradients' norm is nan .*before any parameter"):
        step(run, 1)
    assert all(torch.equal(before[n].nan_to_num(), p.detach().nan_to_num()) for n, p in params.items())
    assert all(not adam.state for adam in build.torch_adams(training.optimizer))  # no moment was written


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU build: bf16, distributed optimizer")
def test_folded_step_trains_like_mcores_step_on_gpu(tiny_hf_dir, tmp_path, batches):
    """build_training on the GPU installs the fold; against fold_grad_scale off: the same norms and losses (bf16)."""
    theirs, _ = _train(tiny_hf_dir, tmp_path / "mcore", batches, fold=False, clip_grad=0.5, gpu=True)
    ours, _ = _train(tiny_hf_dir, tmp_path / "fold", batches, fold=True, clip_grad=0.5, gpu=True)
    print([(r["grad_norm"], o["grad_norm"], r["loss"], o["loss"]) for r, o in zip(theirs, ours)])
    assert theirs[0]["grad_norm"] > 0.5
    for r, o in zip(theirs, ours):
        assert o["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4)
        assert o["loss"] == pytest.approx(r["loss"], rel=1e-4)


def test_a_model_built_after_another_records_its_own_moe_metrics(tiny_hf_dir, tmp_path, batches):
    """mcore's MoE metrics tracker is process-global and sized by the first model that records (here: a one-layer
    MoE model, as the talker's code predictor or any smaller model before this one); build_training starts a fresh
    one, so the tiny thinker's deeper layers do not index past it (IndexError in mcore's record before)."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from omni_model.train.loop import step

    get_moe_metrics_tracker().record("load_balancing_loss", torch.ones(()), layer_number=1, num_layers=1)
    run = _run(tiny_hf_dir, tmp_path, batches, fold=True, clip_grad=1.0)
    assert run.training.thinker.config.num_moe_experts and run.training.thinker.config.num_layers > 1
    record = step(run, 1)
    values = get_moe_metrics_tracker().metrics["load_balancing_loss"].values
    assert values.shape == (run.training.thinker.config.num_layers,), values.shape
    assert record["loss"] > 0
