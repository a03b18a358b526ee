"""Where the checkpoints of a run are, as every stage reads it.

`results/train/latest` is one line: the path of the last COMPLETE checkpoint, relative to the train dir
(`iter_0000020`, or `../model/mcore/checkpoint` when `train.iters` is 0 and the converted weights are the result).
Every checkpoint dir is a Megatron-Core `dist_checkpointing` (torch_dist) dir whose model tensors are saved under the
thinker's own `sharded_state_dict()` keys (no extra prefix), so one loader reads the converted checkpoint and every
training checkpoint, at any layout.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

from ..runtime.publish import publish

LATEST = "latest"


def write_latest(train_dir: Path, checkpoint_dir: Path) -> None:
    """Point `latest` at `checkpoint_dir` atomically (a reader never sees a half-written name)."""
    train_dir = Path(train_dir)
    relative = os.path.relpath(Path(checkpoint_dir).resolve(), train_dir.resolve())
    tmp = train_dir / (LATEST + ".tmp")
    tmp.write_text(relative + "\n")
    os.replace(tmp, train_dir / LATEST)


def read_latest(train_dir: Path) -> Path:
    """The checkpoint dir `latest` names; a clear error when it is missing or names nothing."""
    train_dir = Path(train_dir)
    pointer = train_dir / LATEST
    if not pointer.exists():
        raise FileNotFoundError(f"{pointer} does not exist: no finished training run in {train_dir}")
    target = (train_dir / pointer.read_text().strip()).resolve()
    if not (target / "metadata.json").exists():
        raise FileNotFoundError(f"{pointer} names {target}, which is not a complete dist checkpoint")
    return target


# -- training checkpoints ------------------------------------------------------------------------------------------
# iter_NNNNNNN/ holds, through dist_checkpointing: the model (thinker keys, no prefix), the optimizer (reshardable
# format), and per rank the RNG states and the Energon loader state (ShardedObjects); in common.pt the iteration,
# the scheduler state, the settings digest and the layout. Next to them (rank 0): train_state.json (iteration +
# digest, readable without torch) and metrics.jsonl (the metric lines up to this iteration, so a resumed run rebuilds
# the metrics file that Snakemake deleted). Written as iter_NNNNNNN.tmp, renamed when complete, then `latest`.

ITER_DIR = re.compile(r"^iter_(\d{7})$")
TRAIN_STATE = "train_state.json"
TB_PREVIOUS = "tb.previous"  # the TensorBoard events of the previous run, kept until this run's first checkpoint
METRICS = "metrics.jsonl"
# the distributed optimizer saves its state like a plain optimizer's (one tensor per model tensor: reshards to any
# layout); no per-optimizer key prefix
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def iter_dir(train_dir: Path, iteration: int) -> Path:
    return Path(train_dir) / f"iter_{iteration:07d}"


def complete_checkpoints(train_dir: Path) -> list[tuple[int, str, Path]]:
    """(iteration, digest, dir) of every complete training checkpoint under train_dir, oldest first."""
    found = []
    train_dir = Path(train_dir)
    if not train_dir.is_dir():
        return found
    for path in train_dir.iterdir():
        match = ITER_DIR.match(path.name)
        state = path / TRAIN_STATE
        if match and state.is_file() and (path / "metadata.json").is_file():
            found.append((int(match.group(1)), json.loads(state.read_text())["digest"], path))
    return sorted(found)


def choose_resume(train_dir: Path, digest: str, iters: int) -> Optional[Path]:
    """The newest complete checkpoint of this run (same settings digest, iteration <= iters), or None."""
    matching = [path for iteration, d, path in complete_checkpoints(train_dir) if d == digest and iteration <= iters]
    return matching[-1] if matching else None


def clear_interrupted_saves(train_dir: Path) -> list[str]:
    """Remove the half-written saves (iter_*.tmp) an interrupted run left: never a checkpoint. Returns their names."""
    removed = sorted(p.name for p in Path(train_dir).glob("iter_*.tmp") if p.is_dir())
    for name in removed:
        shutil.rmtree(Path(train_dir) / name)
    return removed


def clear_other_runs(train_dir: Path, keep: Optional[Path]) -> list[str]:
    """Remove every iter_* dir except `keep` (and older ones of the same run), and the TensorBoard events set aside
    at the start of this run (TB_PREVIOUS): what a different run left behind. Called once this run's first
    checkpoint is complete, so a run that fails before it leaves the previous run's checkpoints as they were.
    Returns the removed names."""
    train_dir = Path(train_dir)
    removed = []
    if not train_dir.is_dir():
        return removed
    keep_digest = json.loads((keep / TRAIN_STATE).read_text())["digest"] if keep else None
    keep_iter = int(ITER_DIR.match(keep.name).group(1)) if keep else -1
    for path in sorted(train_dir.iterdir()):
        if path.name == TB_PREVIOUS or (path.name.startswith("iter_") and path.is_dir() and not _same_run(
                path, keep_digest, keep_iter)):
            shutil.rmtree(path)
            removed.append(path.name)
    return removed


def _same_run(path: Path, digest: Optional[str], up_to: int) -> bool:
    match, state = ITER_DIR.match(path.name), path / TRAIN_STATE
    return bool(match and state.is_file() and json.loads(state.read_text())["digest"] == digest
                and int(match.group(1)) <= up_to)


def load_model_weights(thinker, checkpoint_dir) -> None:
    """Model weights from any torch_dist checkpoint (convert's or a training one), at this rank's layout: the convert
    package's one loader."""
    from omni_model.convert import load_checkpoint

    load_checkpoint(thinker, Path(checkpoint_dir))


def _rng_state() -> dict:
    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict:
    import torch
    from megatron.core import parallel_state as ps

    return {"world": torch.distributed.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "ep": ps.get_expert_model_parallel_world_size(),
            "etp": ps.get_expert_tensor_parallel_world_size(), "cp": ps.get_context_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _per_rank_objects(rng=None, loader_state=None, with_rng: bool = True, with_loader: bool = True) -> dict:
    """ShardedObjects of this rank: RNG states (one per rank) and the loader state (one per DP rank; the TP/PP/CP
    ranks of a replica hold the same stream, the first of them saves it)."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    replica = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
               ps.get_context_parallel_rank())
    objects = {}
    if with_rng:
        objects["rng_state"] = ShardedObject("train.rng_state", rng, (world,), (rank,), replica_id=0)
    if with_loader:
        objects["loader_state"] = ShardedObject("train.loader_state", loader_state, (dp,), (dp_rank,),
                                                replica_id=replica)
    return objects


def _fused_experts_view(thinker, model_state: dict) -> dict:
    """The model sharded state as the optimizer must see it: mcore maps optimizer state to model ShardedTensors by
    parameter identity, but our grouped experts keep all local experts in ONE parameter [E, out, in] while the
    checkpoint speaks TE's per-expert tensors `weight{e}` (views). For each such parameter a ShardedTensorFactory
    (mcore's device for "a parameter saved as a transformation of itself") replaces the per-expert entries: it
    splits any same-shaped optimizer state (exp_avg, exp_avg_sq, fp32 main param) into the same per-expert
    tensors (keys prefixed optimizer.state.<name>.), and stacks them back on load. So optimizer states reshard
    over EP/ETP/TP exactly like the weights."""
    from dataclasses import replace

    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    from omni_model.model.experts import GroupedLinear

    view = dict(model_state)
    for name, module in thinker.named_modules():
        if not isinstance(module, GroupedLinear):
            continue
        names = [f"{name}.weight{e}" for e in range(module.num_gemms)]
        experts = [view.pop(n) for n in names]

        def build(key, data, replica_id, flattened_range, experts=experts):
            assert flattened_range is None, "flattened optimizer state: use a fully reshardable optimizer format"
            prefix = key[: -len(FUSED_MARK)]  # optimizer.state.<state name>.
            out = {}
            for e, expert in enumerate(experts):
                fields = dict(key=prefix + expert.key, data=data[e], replica_id=replica_id)
                if isinstance(expert, ShardedTensorFactory):  # fc1: mcore's gate/up (SwiGLU) split, applied here
                    out[e] = replace(expert, **fields).build()
                else:
                    out[e] = replace(expert, dtype=data.dtype, **fields)
            return out

        def merge(loaded: dict, experts=experts):
            return torch.stack([expert.merge_fn(loaded[e]) if isinstance(expert, ShardedTensorFactory)
                                else loaded[e] for e, expert in enumerate(experts)])

        view[f"{name}.weight"] = ShardedTensorFactory(
            key=FUSED_MARK, data=module.weight, build_fn=build, merge_fn=merge, replica_id=experts[0].replica_id)
    return view


FUSED_MARK = "<fused-experts>"


def _sharded_training_state(training, is_loading: bool, rng=None, loader_state=None, with_rng: bool = True,
                            with_loader: bool = True) -> dict:
    from omni_model.model.lora import lora_sharded_state_dict

    adapters = lora_sharded_state_dict(training.thinker)
    if adapters:  # LoRA: the adapters only (the frozen base is the converted checkpoint, named by base_digest)
        model_state = optimizer_view = adapters
    else:
        model_state = training.thinker.sharded_state_dict()  # no prefix: the thinker's own keys
        optimizer_view = _fused_experts_view(training.thinker, model_state)
    state = {"model": model_state,
             "optimizer": training.optimizer.sharded_state_dict(optimizer_view, is_loading=is_loading,
                                                                metadata=OPTIMIZER_METADATA)}
    state.update(_per_rank_objects(rng, loader_state, with_rng, with_loader))
    return state


def prune_checkpoints(train_dir: Path, digest: str, keep: Optional[int]) -> list[str]:
    """Remove all but the newest `keep` complete checkpoints of this run (None = keep all). Called only after a newer
    one is complete and `latest` names it, so a crash never leaves the run without a checkpoint. A 30B-A3B training
    checkpoint is ~0.5 TB with its optimizer state: keeping every one fills a disk within a few saves."""
    if not keep:
        return []
    mine = [path for _, d, path in complete_checkpoints(train_dir) if d == digest]
    removed = mine[:-keep]
    for path in removed:
        shutil.rmtree(path)
    return [path.name for path in removed]


def base_digest(init_checkpoint) -> str:
    """What a LoRA checkpoint applies to: the digest of the HF model the converted base checkpoint was made from
    (convert.json's source manifest), else a fingerprint of the base checkpoint's files."""
    import hashlib

    record = Path(init_checkpoint).parent / "convert.json"
    if record.is_file():
        manifest = json.loads(record.read_text()).get("source", {}).get("manifest")
        if manifest:
            return manifest
    files = sorted((str(p.relative_to(init_checkpoint)), p.stat().st_size)
                   for p in Path(init_checkpoint).rglob("*") if p.is_file())
    return "files:" + hashlib.sha256(json.dumps(files).encode()).hexdigest()


def lora_record(checkpoint: Path) -> Optional[dict]:
    """{"lora": spec, "base_digest": ...} of a LoRA training checkpoint, None for a full one (train_state.json)."""
    state = Path(checkpoint) / TRAIN_STATE
    record = json.loads(state.read_text()) if state.is_file() else {}
    return {"lora": record["lora"], "base_digest": record["base_digest"]} if "lora" in record else None


def check_base(record: dict, digest: str, what: str) -> None:
    """Refuse adapters trained on another base model."""
    if record["base_digest"] != digest:
        from omni_model.model.lora import LoraError

        raise LoraError(f"{what}: the LoRA adapters were trained on the base model {record['base_digest']}, but the "
                        f"base given is {digest}; use the base checkpoint the adapters were trained on")


class CheckpointSpaceError(OSError):
    """The checkpoint about to be saved does not fit the free space of its filesystem."""


SPACE_MARGIN_BYTES = 256 * 2**20  # metadata, common.pt, the loader state and the copied metrics beside the tensors


def written_bytes(state: dict) -> int:
    """Bytes this rank's tensors take in the checkpoint of `state`: the main replica of each sharded tensor (a
    distributed optimizer's flat slice counts its own range; replicas are written by another rank)."""
    import torch
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica

    return sum(value.data.numel() * value.data.element_size() for value in nested_values(state)
               if isinstance(value, (ShardedTensor, ShardedTensorFactory)) and isinstance(value.data, torch.Tensor)
               and is_main_replica(value.replica_id))


def require_space_for(state: dict, directory: Path) -> None:
    """Refuse, on every rank and before writing, a checkpoint larger than its filesystem's free space: a full disk
    midway fails inside torch's writer with 'unexpected pos' and no word of space (the full-depth LoRA run on a
    64 GiB disk beside its 60 GB base). The ranks' bytes are summed: checkpoints live on one shared filesystem."""
    import torch

    from ..runtime.parallel import reduction_device

    need = torch.tensor([written_bytes(state)], dtype=torch.float64, device=reduction_device())
    torch.distributed.all_reduce(need)
    existing = next(path for path in (directory, *directory.parents) if path.exists())  # other nodes: no tmp dir yet
    need, free = int(need.item()) + SPACE_MARGIN_BYTES, shutil.disk_usage(existing).free
    if need > free:
        raise CheckpointSpaceError(
            f"the checkpoint needs {need / 2**30:.2f} GiB but {directory.parent} has {free / 2**30:.2f} GiB free: free "
            f"space there, lower train.keep_checkpoints, or point the train directory at a larger filesystem "
            f"(nothing was written; the previous checkpoint is intact)")


def save_training_checkpoint(train_dir: Path, iteration: int, training, loader, digest: str,
                             metrics_path: Path, keep: Optional[int] = None) -> Path:
    """Save everything needed to continue exactly; atomic (iter_N.tmp -> iter_N), then `latest`, then remove what
    other runs left (clear_other_runs) and prune to the newest `keep` checkpoints. All ranks call it. A LoRA run's
    checkpoint holds the adapters, not the model, and records `training.lora` ({"lora": train.lora, "base_digest":
    the base model's digest})."""
    import torch
    from megatron.core import dist_checkpointing

    final = iter_dir(train_dir, iteration)
    tmp = final.with_name(final.name + ".tmp")
    lora = training.lora
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    state = _sharded_training_state(training, is_loading=False, rng=_rng_state(), loader_state=loader.save_state_rank())
    state.update({"iteration": iteration, "digest": digest, "layout": _layout(),
                  "scheduler": training.scheduler.state_dict(), **(lora or {})})
    require_space_for(state, tmp)
    dist_checkpointing.save(state, str(tmp))
    torch.distributed.barrier()
    if rank0:
        metrics_path = Path(metrics_path)
        shutil.copyfile(metrics_path, tmp / METRICS) if metrics_path.exists() else (tmp / METRICS).write_text("")
        (tmp / TRAIN_STATE).write_text(json.dumps({"iteration": iteration, "digest": digest, **(lora or {})}) + "\n")
        publish(tmp, final)  # another run's checkpoint of the same number goes only once this one is in place
        write_latest(train_dir, final)
        removed = clear_other_runs(train_dir, final)
        if removed:
            print(f"[finetune] first checkpoint of this run complete: removed {removed} of another run", flush=True)
        prune_checkpoints(train_dir, digest, keep)
    torch.distributed.barrier()
    return final


def _prepare_distributed_optimizer_load(optimizer) -> None:
    """Two gaps of mcore's DistributedOptimizer (0.16.1; 0.19.2's source unchanged there) on torch's Adam (no
    TE/Apex), both met by a resume on the H200 (the CPU runs use the plain optimizer and never reach them):
    - building the load request reads the common Adam `step` from the optimizer state and asserts one value, but a
      fresh torch Adam has no state until its first step: the state is materialised first with mcore's own
      initialiser (one step on zero gradients; whatever it changes is replaced by the checkpoint right after);
    - the fully reshardable parameter-state load copies every state key of the live optimizer from the checkpoint,
      `step` included, which that format does not store (it restores `step` from the param groups, one shared
      tensor): the per-parameter copy is made to leave `step` alone."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    _leave_step_to_the_param_groups(DistributedOptimizer)
    for leaf in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(leaf, DistributedOptimizer) and not leaf.optimizer.state:
            leaf._init_optimizer_states_with_dummy_values()


def unshare_adam_steps(optimizer) -> None:
    """Give every parameter's Adam state its own `step` tensor after a load.

    mcore 0.16.1's DistributedOptimizer (torch Adam, no TE/Apex) restores `step` as ONE tensor put into every
    parameter's state, and torch's Adam increments each parameter's step in place: after a resume the shared counter
    advanced by the number of parameters per optimizer step, so Adam's bias correction was wrong from the first
    update on (H200, tiny model: the step after the resumed one was off by 1.3e-3 relative, growing to 1.9e-3)."""
    import torch

    from .adam import torch_adams

    for adam in torch_adams(optimizer):
        for group in adam.param_groups:
            for param in group["params"]:
                state = adam.state.get(param, {})
                if isinstance(state.get("step"), torch.Tensor):
                    # fused Adam (GPU) keeps its counters on the parameters' device, the others on the host
                    device = param.device if group.get("fused") else torch.device("cpu")
                    state["step"] = state["step"].to(device, torch.float32, copy=True)


def _leave_step_to_the_param_groups(distributed_optimizer_class) -> None:
    original = distributed_optimizer_class._set_main_param_and_optimizer_states
    if getattr(original, "leaves_step", False):
        return

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    set_states.leaves_step = True
    set_states.__upstream__ = original  # the seam "train.distrib_optimizer_load" checks upstream's code (compat)
    distributed_optimizer_class._set_main_param_and_optimizer_states = set_states


def load_training_checkpoint(checkpoint: Path, training) -> dict:
    """Restore model, optimizer and scheduler (at any layout). The loader state too when the data-parallel size is
    the same (the data stream continues exactly, e.g. tp1 -> tp2 on the same number of replicas); the RNG states
    only at the very layout they were saved at. Returns {"iteration", "loader_state" (or None), "same_layout",
    "same_data_parallel"}."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(checkpoint))
    lora = "base_digest" in common
    if lora != (training.lora is not None):
        raise RuntimeError(f"{checkpoint} is a {'LoRA' if lora else 'full'} training checkpoint, but this run "
                           f"{'trains LoRA adapters' if training.lora else 'is full fine-tuning'}")
    if lora:
        check_base(common, training.lora["base_digest"], f"resuming from {checkpoint}")
    _prepare_distributed_optimizer_load(training.optimizer)
    layout = _layout()
    saved_layout = dict(common["layout"])
    saved_layout.setdefault("cp", 1)  # checkpoints from before context parallelism name no cp
    same_layout = saved_layout == layout
    same_dp = saved_layout["dp"] == layout["dp"]
    request = _sharded_training_state(training, is_loading=True, with_rng=same_layout, with_loader=same_dp)
    loaded = dist_checkpointing.load(request, str(checkpoint))
    if lora:
        from omni_model.model.lora import load_adapters

        load_adapters(training.thinker, loaded["model"])
    else:
        training.thinker.load_state_dict(loaded["model"])
    training.optimizer.load_state_dict(loaded["optimizer"])
    unshare_adam_steps(training.optimizer)
    # mcore's load_state_dict steps the scheduler BY the saved num_steps (adds to the current count), and
    # build_scheduler already counted the first step: the saved count includes that step, so start from 0
    training.scheduler.num_steps = 0
    training.scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return {"iteration": int(common["iteration"]), "same_layout": same_layout, "same_data_parallel": same_dp,
            "loader_state": loaded["loader_state"] if same_dp else None, "saved_layout": saved_layout}
