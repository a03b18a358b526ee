"""Save a model built on the meta device as one torch_dist checkpoint, one group of layers at a time: the host
memory of a save is one group (its tensors + dist_checkpointing's copy of them), not the model.

    groups = save_groups(thinker, group_bytes)               # [[unit, ...], ...]: each LLM layer, each tower, ...
    for index, units in enumerate(groups):
        with materialised(thinker, units):                    # meta -> empty CPU tensors, back to meta on exit
            ...fill them...
            save_part(thinker, units, parts_dir, index)       # a complete torch_dist checkpoint of these keys
    merge_parts(parts_dir, len(groups), checkpoint_dir)       # rank 0: one torch_dist checkpoint

Why parts and a merge: `dist_checkpointing.save` writes what one call is given. The torch_dist format is a PyTorch
DCP folder with ONE `.metadata` (every tensor's global shape, its chunks and the file and byte range of each chunk),
and a second save into the same folder replaces it (megatron-core only warns "Overwriting old incomplete /
corrupted checkpoint"); neither megatron-core (0.16-0.19) nor torch DCP has an incremental save. So each group is saved
as its own complete torch_dist checkpoint (mcore's sharding validation runs on each: a unit holds whole checkpoint
keys, see SAVE_UNIT), and the parts are merged: their tensor files moved into the checkpoint folder under a part
prefix, their `.metadata` joined into one (the chunks of every key, the storage entries re-pointed at the moved
files), written by torch's own FileSystemWriter.finish. The result is what a one-shot save writes (same keys, global
shapes, chunks and bytes; only the file names differ), loadable and reshardable at any layout, and checked here to
cover every key's global tensor exactly once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import shutil
from pathlib import Path
from typing import Dict, Iterator, List

import torch

# The save unit of a parameter or state-dict name: each LLM decoder layer alone (its checkpoint keys are its own);
# everything else by its top-level module (language_model's embedding + final norm + output layer, the vision tower,
# the audio tower). The towers stay whole: mcore stacks a tower's layers under one checkpoint key (a layer axis
# prepended), and each part must hold whole keys for mcore's per-save sharding validation.
SAVE_UNIT = re.compile(r"^language_model\.decoder\.layers\.\d+(?=\.)|^[^.]+")
PART_PREFIX = "part{:04d}"
METADATA = ".metadata"
SIDE_FILES = ("metadata.json",)  # mcore's backend record: rank 0 writes it per save
# mcore 0.19 saves the common (non-sharded) state as this one ShardedObject inside the DCP checkpoint (0.16 wrote a
# common.pt beside it): every part holds one, the merged checkpoint keeps part 0's (seam convert.common_state_object)
COMMON_STATE = ("common_state", (1,), (0,))


class GroupedSaveError(RuntimeError):
    """The parts do not merge into one checkpoint (a key saved twice, a chunk missing); the message names it."""


def save_unit(name: str) -> str:
    return SAVE_UNIT.match(name).group(0)


def _parameters(model: torch.nn.Module):
    """(module, attribute, parameter, full name) of every parameter, shared ones under each name."""
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                yield module, attr, param, f"{module_name}.{attr}" if module_name else attr


def save_groups(model: torch.nn.Module, group_bytes: int) -> List[List[str]]:
    """The model's save units in model order, batched into groups of at most ~group_bytes (a unit is never split;
    0 = one unit per group). Every rank of one pipeline stage has the same units and sizes, so the same groups."""
    sizes: Dict[str, int] = {}
    seen = set()
    for _, _, param, name in _parameters(model):
        if id(param) not in seen:
            seen.add(id(param))
            unit = save_unit(name)
            sizes[unit] = sizes.get(unit, 0) + param.numel() * param.element_size()
    groups: List[List[str]] = []
    size = 0
    for unit, nbytes in sizes.items():
        if not groups or size + nbytes > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(unit)
        size += nbytes
    return groups


@contextlib.contextmanager
def materialised(model: torch.nn.Module, units) -> Iterator[None]:
    """The units' meta parameters replaced by uninitialised CPU ones (attributes kept: mcore's parallel attributes);
    on exit the meta ones are put back and the CPU memory is freed."""
    units = set(units)
    originals, real = [], {}
    for module, attr, param, name in list(_parameters(model)):
        if save_unit(name) not in units:
            continue
        if not param.is_meta:
            raise GroupedSaveError(f"{name} is not on the meta device: build the model under torch.device('meta')")
        if id(param) not in real:
            new = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype), requires_grad=param.requires_grad)
            new.__dict__.update(param.__dict__)
            real[id(param)] = new
        originals.append((module, attr, param))
        module._parameters[attr] = real[id(param)]
    try:
        yield
    finally:
        for module, attr, param in originals:
            module._parameters[attr] = param
        real.clear()


def _sharded_values(value) -> list:
    if isinstance(value, dict):
        return [v for item in value.values() for v in _sharded_values(item)]
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _sharded_values(item)]
    return [value]


def part_state_dict(model: torch.nn.Module, units) -> dict:
    """The model's sharded state dict restricted to the units' entries (every other tensor is still on meta)."""
    units = set(units)
    part = {name: value for name, value in model.sharded_state_dict().items() if save_unit(name) in units}
    for name, value in part.items():
        for item in _sharded_values(value):
            data = getattr(item, "data", None)
            if torch.is_tensor(data) and data.is_meta:
                raise GroupedSaveError(f"{name}: its tensor is still on the meta device (not in the saved units)")
    return part


def save_part(model: torch.nn.Module, units, parts_dir: Path, index: int) -> None:
    """One dist_checkpointing.save of the units (every rank calls it, with its own units or none)."""
    from megatron.core import dist_checkpointing

    target = Path(parts_dir) / PART_PREFIX.format(index)
    if torch.distributed.get_rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(part_state_dict(model, units) if units else {}, str(target))


def merge_parts(parts_dir: Path, count: int, checkpoint_dir: Path) -> dict:
    """Rank 0: the `count` part checkpoints of `parts_dir` -> one torch_dist checkpoint in `checkpoint_dir` (files
    moved, parts removed). Returns {"keys": n, "chunks": n, "files": n}."""
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata
    from torch.distributed.checkpoint.storage import WriteResult

    parts_dir, checkpoint_dir = Path(parts_dir), Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    common_key = _check_common_states(parts_dir, count)
    merged = Metadata(state_dict_metadata={}, planner_data={}, storage_data={})
    mcore_data: dict = {}
    files = 0
    for index in range(count):
        part = parts_dir / PART_PREFIX.format(index)
        metadata = FileSystemReader(str(part)).read_metadata()
        prefix = PART_PREFIX.format(index)
        for key, stored in metadata.state_dict_metadata.items():
            if key == common_key and index > 0:
                continue  # equal to part 0's (checked above); its bytes stay unreferenced in the part's file
            _merge_entry(merged.state_dict_metadata, key, stored, TensorStorageMetadata, BytesStorageMetadata)
        for entry, info in metadata.storage_data.items():
            if entry.fqn == common_key and index > 0:
                continue
            if entry in merged.storage_data:
                raise GroupedSaveError(f"{entry.fqn} at {tuple(entry.offset or ())} is saved by two parts")
            merged.storage_data[entry] = dataclasses.replace(info, relative_path=prefix + info.relative_path)
        merged.planner_data.update(metadata.planner_data or {})
        mcore_data.update(getattr(metadata, "mcore_data", None) or {})
        for path in part.glob("*.distcp"):
            path.rename(checkpoint_dir / (prefix + path.name))
            files += 1
    check_coverage(merged.state_dict_metadata)
    if mcore_data:  # megatron-core's legacy entries on the DCP Metadata (read with getattr(..., {}) on load)
        merged.mcore_data = mcore_data
    for name in SIDE_FILES:
        shutil.copyfile(parts_dir / PART_PREFIX.format(0) / name, checkpoint_dir / name)
    results = [[WriteResult(index=entry, size_in_bytes=info.length, storage_data=info)
                for entry, info in merged.storage_data.items()]]
    FileSystemWriter(str(checkpoint_dir), sync_files=False).finish(merged, results)  # torch's own .metadata writer
    shutil.rmtree(parts_dir)
    chunks = sum(len(m.chunks) for m in merged.state_dict_metadata.values() if hasattr(m, "chunks"))
    return {"keys": len(merged.state_dict_metadata), "chunks": chunks, "files": files}


def _check_common_states(parts_dir: Path, count: int) -> str:
    """Part 0's common state stands for all: every part's (a model's non-sharded entries; none today) must be the
    same, else some would be lost. Returns the common state's checkpoint key (mcore's own, as its loader builds it)."""
    from megatron.core.dist_checkpointing import load_common_state_dict
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    key, shape, offset = COMMON_STATE
    first = load_common_state_dict(parts_dir / PART_PREFIX.format(0))
    for index in range(1, count):
        other = load_common_state_dict(parts_dir / PART_PREFIX.format(index))
        if other != first:
            raise GroupedSaveError(f"save part {index} has its own common state {sorted(other)} (part 0: "
                                   f"{sorted(first)}): it would be lost in the merge")
    return ShardedObject(key, None, shape, offset).unique_key


def _merge_entry(into: dict, key: str, stored, tensor_type, bytes_type) -> None:
    if key not in into:
        into[key] = dataclasses.replace(stored, chunks=list(stored.chunks)) if isinstance(stored, tensor_type) \
            else stored
        return
    have = into[key]
    if not (isinstance(stored, tensor_type) and isinstance(have, tensor_type)):
        raise GroupedSaveError(f"{key}: saved by two parts")
    if tuple(have.size) != tuple(stored.size) or have.properties.dtype != stored.properties.dtype:
        raise GroupedSaveError(f"{key}: global shape/dtype {tuple(have.size)} {have.properties.dtype} in one part, "
                               f"{tuple(stored.size)} {stored.properties.dtype} in another")
    have.chunks.extend(stored.chunks)


def check_coverage(state_dict_metadata: dict) -> None:
    """Every tensor key's chunks are distinct and add up to its global tensor (what mcore's save-time validation
    checks per part, for the merged whole)."""
    for key, stored in state_dict_metadata.items():
        chunks = getattr(stored, "chunks", None)
        if chunks is None:
            continue
        offsets = [tuple(c.offsets) for c in chunks]
        if len(set(offsets)) != len(offsets):
            raise GroupedSaveError(f"{key}: a chunk is saved twice")
        covered = sum(math.prod(c.sizes) for c in chunks)
        if covered != math.prod(stored.size):
            raise GroupedSaveError(f"{key}: the chunks cover {covered} of {math.prod(stored.size)} elements")
