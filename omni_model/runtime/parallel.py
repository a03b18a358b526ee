"""torch.distributed + Megatron-Core parallel_state for a (tp, pp, ep, etp, cp) layout, on gloo (CPU) or nccl (GPU).

    from omni_model.runtime.parallel import init_parallel, destroy_parallel
    init_parallel(tp=2, ep=2, seed=1234)       # under torchrun, or world size 1 without it
    ...
    destroy_parallel()

On a machine without CUDA the CPU patches (runtime.cpu_patches) are applied first and the backend is gloo. Before
anything, the installed megatron-core, torch and megatron-energon are checked against the versions omni_model's seams
were verified on (omni_model.compat).
"""

from __future__ import annotations

import datetime
import os
from typing import Optional

import torch

from . import cpu_patches, multi_tensor


def exit_with_parent() -> None:
    """Have the kernel SIGKILL this process when the process that started it dies (Linux prctl PR_SET_PDEATHSIG).

    torchrun's agent starts its workers in sessions of their own, so a SIGKILL of the agent (a cancelled Slurm job
    step, `kill -9` of the launcher) leaves them training on, and a resumed run then shares the training directory
    with them (seen on the H200: the orphan went on saving while the new run deleted its half-written checkpoint)."""
    import signal

    from .launch import die_with_parent

    arm = die_with_parent(signal.SIGKILL, parent=os.getppid())
    if arm is not None:
        arm()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_private_group(backend: str, timeout, attempts: int = 5) -> None:
    """A one-rank group on a free loopback port. The port is free when asked for but not reserved: another process
    on the machine (a parallel test worker, a second stage) can take it before the store binds it (EADDRINUSE seen
    under `make test`), so a taken port is retried with a new one."""
    for attempt in range(attempts):
        try:
            torch.distributed.init_process_group(
                backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=timeout
            )
            return
        except torch.distributed.DistNetworkError as error:
            if "EADDRINUSE" not in str(error) or attempt == attempts - 1:
                raise


def init_parallel(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: Optional[int] = None,
    cp: int = 1,
    vpp: Optional[int] = None,
    seed: int = 1234,
    backend: Optional[str] = None,
    timeout_minutes: int = 10,
) -> None:
    """Initialise torch.distributed (env:// from torchrun, or a private single-process group) and mcore's groups."""
    from ..compat import TRAINING_PACKAGES, require_verified_upstream

    require_verified_upstream(*TRAINING_PACKAGES, where="init_parallel")
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        cpu_patches.apply()
    multi_tensor.apply()
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not torch.distributed.is_initialized():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "RANK" in os.environ:  # torchrun
            if "TORCHELASTIC_RUN_ID" in os.environ:  # a worker of torchrun's agent (not of an srun task launcher)
                exit_with_parent()
            torch.distributed.init_process_group(backend=backend, timeout=timeout)
        else:  # a private single-process group; the environment is left untouched (child processes inherit it)
            _init_private_group(backend, timeout)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp if etp is not None else 1,
        create_gloo_process_groups=not use_cuda or backend == "gloo",
    )
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def reduction_device() -> str:
    """Where a tensor for a collective of the default group must live: NCCL reduces device tensors only."""
    return "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"


def rank_coords() -> dict:
    """This rank's coordinates in the layout, as the HF<->mcore mapping wants them."""
    from megatron.core import parallel_state as ps

    return {
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "ep_rank": ps.get_expert_model_parallel_rank(),
        "etp_rank": ps.get_expert_tensor_parallel_rank(),
    }
