"""train.grad_buffer.FirstWriteDDP (PerfOptions.first_write_grads, the default): the grad buffers are not zeroed per
step and a parameter's first grad of a step is copied into its main grad. Training must be bit-for-bit mcore's (zero
+ add), including a step in which the towers get no grad at all (text-only micro-batches after multimodal ones: their
main grads still hold the last step's values unless something zeroes them)."""

from __future__ import annotations

import warnings

import pytest
import torch

from train_helpers import encode_demo_samples, packed_micro_batches

VISION = "vision_model."


@pytest.fixture(scope="module")
def batches(tiny_hf_dir, tmp_path_factory):
    return packed_micro_batches(encode_demo_samples(tiny_hf_dir, tmp_path_factory.mktemp("demo")),
                                [["image_audio", "text"], ["video"], ["text"]])


def _train(tiny_hf_dir, tmp_path, batches, first_write: bool, gpu: bool = False):
    """Three steps of two micro-batches each through the training loop: (multimodal, video), (text, text),
    (multimodal, text); everything trained. Returns the step records, each step's vision main grads and the final
    parameters."""
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.options import PerfOptions
    from omni_model.train import build
    from omni_model.train.data import TokenCounter
    from omni_model.train.forward_step import forward_step
    from omni_model.train.loop import Run, step
    from omni_model.train.metrics import FlopCounter
    from omni_model.train.settings import TrainSettings

    warnings.filterwarnings("ignore")
    mm, video, text = batches
    settings = TrainSettings(hf_dir=str(tiny_hf_dir), init_checkpoint="", shards="", train_dir=str(tmp_path),
                             train=dict(iters=3, lr_warmup_iters=1, micro_batch_size=1, global_batch_size=2,
                                        clip_grad=1.0, lr=1e-3, seed=1234, gpus_per_node=int(gpu)))
    build.init_training_parallel(settings)
    training = build.build_training(settings, load_initial_weights=False,
                                    options=PerfOptions(first_write_grads=first_write))
    load_hf_into_model(training.thinker, tiny_hf_dir, prefix="")
    training.optimizer.reload_model_params()
    run = Run(settings=settings, training=training, forward_step=forward_step, digest="", loader=None,
              batches=TokenCounter(iter([mm, video, text, text, mm, text])), evaluation=[],
              flops=FlopCounter(tiny_hf_dir), peak=None, log=None)
    vision = [p for n, p in training.thinker.named_parameters() if n.startswith(VISION) and p.requires_grad]
    assert vision  # the towers are trained: a text-only step leaves their grads unwritten
    initial = {name: p.detach().clone() for name, p in training.thinker.named_parameters()}
    records, vision_grads = [], []
    for i in (1, 2, 3):  # step 1 has lr 0 (warm-up); steps 2 and 3 update
        records.append(step(run, i))
        vision_grads.append([p.main_grad.clone() for p in vision])
    params = {name: p.detach().clone() for name, p in training.thinker.named_parameters()}
    assert max((initial[n] - p).abs().max().item() for n, p in params.items()) > 1e-4  # the weights did move
    return training, records, vision_grads, params


def test_first_written_grads_train_bit_for_bit_like_zeroed_buffers(tiny_hf_dir, tmp_path, batches):
    from megatron.core.distributed import DistributedDataParallel

    from omni_model.train.grad_buffer import FirstWriteDDP

    theirs, their_records, their_vision, their_params = _train(tiny_hf_dir, tmp_path / "mcore", batches, False)
    ours, our_records, our_vision, our_params = _train(tiny_hf_dir, tmp_path / "first", batches, True)
    assert type(theirs.model) is DistributedDataParallel and isinstance(ours.model, FirstWriteDDP)
    print("grad norms (mcore, first-write):", [(r["grad_norm"], o["grad_norm"]) for r, o in
                                               zip(their_records, our_records)])
    # step 1 wrote the vision grads; step 2 (text only) must see them zero, as mcore's zeroed buffer has them
    assert any(g.abs().max() > 0 for g in our_vision[0])
    assert all(torch.count_nonzero(g) == 0 for g in our_vision[1])
    for theirs_step, ours_step in zip(their_vision, our_vision):
        assert all(torch.equal(a, b) for a, b in zip(theirs_step, ours_step))
    assert [r["grad_norm"] for r in our_records] == [r["grad_norm"] for r in their_records]
    assert [r["loss"] for r in our_records] == [r["loss"] for r in their_records]
    differ = [n for n, p in our_params.items() if not torch.equal(p, their_params[n])]
    assert not differ, differ[:5]


def test_first_write_refuses_grads_added_inside_the_gemm(tiny_hf_dir):
    """gradient_accumulation_fusion adds wgrads into main_grad behind the hook: a buffer never zeroed would keep the
    last step's values under them, so the combination is refused at construction."""
    from megatron.core.distributed import DistributedDataParallelConfig

    from omni_model.train.grad_buffer import FirstWriteDDP

    config = type("Config", (), {"gradient_accumulation_fusion": True})()
    with pytest.raises(ValueError, match="gradient_accumulation_fusion"):
        FirstWriteDDP(config=config, ddp_config=DistributedDataParallelConfig(), module=torch.nn.Linear(2, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU build: bf16 params, distributed optimizer")
def test_first_written_grads_train_like_zeroed_buffers_on_gpu(tiny_hf_dir, tmp_path, batches):
    """The GPU's build (bf16 params, fp32 main grads in the distributed optimizer's buffers, fused Adam, the folded
    grad scale): the same losses and grad norms as mcore's zeroed buffers (bf16 kernels with atomics: not bitwise),
    and the vision main grads of the text-only step zero."""
    _, theirs, _, _ = _train(tiny_hf_dir, tmp_path / "mcore", batches, False, gpu=True)
    _, ours, our_vision, _ = _train(tiny_hf_dir, tmp_path / "first", batches, True, gpu=True)
    print([(r["grad_norm"], o["grad_norm"], r["loss"], o["loss"]) for r, o in zip(theirs, ours)])
    assert all(torch.count_nonzero(g) == 0 for g in our_vision[1])
    for r, o in zip(theirs, ours):
        assert o["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4)
        assert o["loss"] == pytest.approx(r["loss"], rel=1e-4)
