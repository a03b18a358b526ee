"""model.cross_entropy's fused cross-entropy (the GPU's; run eagerly here) against torch's own cross-entropy (float64
reference): the per-token loss and the gradient of the logits, in fp32 and bf16, with ignore labels; the vocab split
over two ranks (gloo) gives the unsplit result; it equals mcore's function (what the CPU runs); and on the GPU the
torch.compile'd kernels give mcore's numbers."""

import functools
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from omni_model.model.cross_entropy import FusedVocabParallelCrossEntropy
from spawn_ranks import spawn_on_free_port

VOCAB = 1000


def _inputs(seed=0, tokens=37, dtype=torch.float32, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, 2, vocab, generator=g) * 4).to(dtype=dtype)
    target = torch.randint(0, vocab, (tokens, 2), generator=g)
    target[::5, 0] = -100  # ignore labels: masked by the caller, must not disturb other rows
    grad_loss = torch.rand(tokens, 2, generator=g)
    return logits, target, grad_loss


def _reference(logits, target, grad_loss):
    """torch's cross-entropy in float64 (its ignore_index rows: loss 0, no gradient)."""
    x = logits.detach().double().requires_grad_(True)
    loss = F.cross_entropy(x.reshape(-1, x.shape[-1]), target.reshape(-1), reduction="none").view(target.shape)
    (loss * grad_loss.double()).sum().backward()
    return loss.detach(), x.grad


def _run(loss_fn, logits, target, grad_loss):
    """A loss function as the model's caller uses it: ignored rows masked out (their value is not a cross-entropy)."""
    x = logits.detach().clone().requires_grad_(True)
    loss = loss_fn(x, target) * (target >= 0)
    (loss * grad_loss).sum().backward()
    return loss.detach(), x.grad


def _fused(tp_group=None):
    return lambda x, target: FusedVocabParallelCrossEntropy.apply(x, target, tp_group)


def test_matches_torch_cross_entropy_fp32():
    logits, target, grad_loss = _inputs()
    loss, grad = _run(_fused(), logits, target, grad_loss)
    ref_loss, ref_grad = _reference(logits, target, grad_loss)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert (loss.double() - ref_loss).abs().max() < 2e-5
    assert (grad.double() - ref_grad).abs().max() < 1e-6
    assert grad[::5, 0].abs().max() == 0  # ignored rows: no gradient once the caller masks them


def test_matches_torch_cross_entropy_bf16_logits():
    """bf16 logits: fp32 math inside, the loss in fp32, the gradient back in bf16 (one rounding of the exact one)."""
    logits, target, grad_loss = _inputs(seed=1, dtype=torch.bfloat16)
    loss, grad = _run(_fused(), logits, target, grad_loss)
    ref_loss, ref_grad = _reference(logits.float(), target, grad_loss)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert (loss.double() - ref_loss).abs().max() < 2e-5
    assert (grad.double() - ref_grad).abs().max() <= 2 ** -8


def test_equals_mcores_function():
    """What the CPU runs (mcore's vocab_parallel_cross_entropy) and the fused form: the same loss and gradient."""
    from megatron.core import tensor_parallel

    from omni_model.runtime.parallel import init_parallel

    init_parallel()  # mcore's function reads the TP group from parallel_state
    logits, target, grad_loss = _inputs(seed=4)
    loss, grad = _run(_fused(), logits, target, grad_loss)
    theirs_loss, theirs_grad = _run(tensor_parallel.vocab_parallel_cross_entropy, logits, target, grad_loss)
    assert (loss - theirs_loss).abs().max() < 1e-5
    assert (grad - theirs_grad).abs().max() < 1e-7


def _split_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    logits, target, grad_loss = _inputs(seed=2)
    half = VOCAB // 2
    out[rank] = _run(_fused(torch.distributed.group.WORLD), logits[..., rank * half:(rank + 1) * half], target,
                     grad_loss)
    torch.distributed.destroy_process_group()


def test_vocab_split_over_two_ranks_gives_the_unsplit_loss():
    out = mp.Manager().dict()
    spawn_on_free_port(_split_worker, (out,))
    logits, target, grad_loss = _inputs(seed=2)
    ref_loss, ref_grad = _reference(logits, target, grad_loss)
    assert torch.equal(out[0][0], out[1][0])  # every rank holds the whole loss
    assert (out[0][0].double() - ref_loss).abs().max() < 2e-5
    assert (torch.cat([out[0][1], out[1][1]], -1).double() - ref_grad).abs().max() < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (torch.compile'd kernels)")
def test_compiled_kernels_match_mcore_on_gpu():
    """The GPU path is torch.compile'd; at the real vocab and bf16 its loss and gradient equal mcore's function."""
    from omni_model.model import cross_entropy
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    for tokens in (1500, 1333, 1700):  # the first compiles for its shape, the second for any token count
        logits, target, grad_loss = (t.cuda() for t in _inputs(seed=tokens, tokens=tokens, dtype=torch.bfloat16,
                                                               vocab=152064))
        loss, grad = _run(cross_entropy.vocab_parallel_cross_entropy, logits, target, grad_loss)
        mcores = functools.partial(cross_entropy.vocab_parallel_cross_entropy, fuse_on_gpu=False)  # same device
        theirs_loss, theirs_grad = _run(mcores, logits, target, grad_loss)
        assert grad.dtype == theirs_grad.dtype == torch.bfloat16
        assert (loss - theirs_loss).abs().max() < 1e-4
        assert (grad.float() - theirs_grad.float()).abs().max() <= 2 ** -8 * theirs_grad.float().abs().max()
