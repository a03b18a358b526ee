"""HF safetensors -> Megatron-Core torch_dist checkpoint of the thinker, and the one loader every stage uses.

    init_parallel(tp=2, ep=2)                                   # every rank (torchrun), layout from parallel_state
    convert_checkpoint(hf_dir, out_dir, dtype="fp32")           # -> out_dir/checkpoint/ + HF files + convert.json
    ...
    thinker = build_thinker(config, perform_initialization=False)   # any layout
    load_checkpoint(thinker, out_dir / "checkpoint")

Each rank builds its own shard of the thinker on the meta device (no memory), then one save group at a time (a few
save units of up to `group_bytes`; a unit is one LLM layer, one tower, the rest of the LLM) materialises the group,
copies its HF tensors in one at a time (mmap read -> mapped -> copied -> freed: `mapping.copy_into_model`), and all
ranks `dist_checkpointing.save` that part of the thinker's `sharded_state_dict()` together; the parts are merged into
one torch_dist checkpoint (`grouped_save`: why parts and how). Peak host memory is about twice the largest group plus
a constant, not the model. The dist checkpoint holds global tensors, so it loads at any TP/PP/EP/ETP layout.
Everything is written to `<out_dir>.staging` first and renamed into place last: a killed job never leaves a
checkpoint that looks complete. `talker.*` / `code2wav.*` are not the thinker's: they are listed in convert.json and
left for export, which copies them from the HF checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..runtime.logs import Progress
from ..runtime.publish import fresh_staging, publish, staging_path
from .grouped_save import materialised, merge_parts, save_groups, save_part, save_unit
from .mapping import Mapper, MappingError, SafetensorsReader, copy_into_model, current_coord

CHECKPOINT = "checkpoint"
SAVE_PARTS = "checkpoint.parts"  # the save groups' part checkpoints, merged into CHECKPOINT and removed
CONVERT_JSON = "convert.json"
PARITY_JSON = "parity.json"
NOT_THINKER = ("talker.", "code2wav.")
WEIGHT_FILES = (".safetensors", "model.safetensors.index.json")
PARTS = {"llm": ("thinker.model.", "thinker.lm_head."), "vision": ("thinker.visual.",),
         "audio": ("thinker.audio_tower.",), "talker": ("talker.",), "code2wav": ("code2wav.",)}


def resolve_dtype(name) -> torch.dtype:
    """`auto` = bf16 on a GPU machine, fp32 on CPU (mcore's CPU path is fp32 only)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"convert.dtype {name!r}: expected auto, fp32 or bf16")
    return table[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def check_source_dtypes(reader: SafetensorsReader) -> None:
    """Every thinker tensor must have the checkpoint's declared dtype (config `dtype` / `torch_dtype`)."""
    declared = reader.config.get("dtype") or reader.config.get("torch_dtype")
    if declared is None:
        return
    expected = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(str(declared).replace("torch.", ""))
    for key in reader.keys():
        if key.startswith("thinker.") and expected and reader.dtype(key) != expected:
            raise MappingError(f"{key}: dtype {reader.dtype(key)} but the checkpoint's config declares {declared}")


def parameter_counts(reader: SafetensorsReader) -> dict:
    """Parameters per part (llm, vision, audio, talker, code2wav) from the safetensors headers."""
    counts = {part: 0 for part in PARTS}
    for key in reader.keys():
        for part, prefixes in PARTS.items():
            if key.startswith(prefixes):
                counts[part] += reader.numel(key)
    return counts


def manifest_digest(hf_dir: Path) -> Optional[str]:
    path = Path(hf_dir) / "MANIFEST.json"
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def copy_hf_side_files(hf_dir: Path, out_dir: Path) -> list[str]:
    """Config, generation config, tokenizer, chat template, preprocessor files: every non-weight file."""
    from ..checkpoint_files import MANIFEST, list_files

    copied = []
    for rel in list_files(Path(hf_dir)):
        if rel.endswith(WEIGHT_FILES) or rel == MANIFEST:
            continue
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(hf_dir) / rel, out_dir / rel)  # follows links (a `local` source links its files)
        copied.append(rel)
    return copied


# Fill and save at most ~this many bytes of the model at once (a save unit, one LLM layer or one tower, is never
# split): the conversion's peak host memory is about twice the largest group (its tensors + dist_checkpointing's
# copy of the experts' per-expert views) plus a constant, whatever the model's depth. Small models save in one go.
DEFAULT_GROUP_BYTES = 256 << 20


def convert_checkpoint(hf_dir, out_dir, *, dtype="auto", use_te: bool = False,
                       log: Callable[[str], None] = print, model_kw: Optional[dict] = None,
                       group_bytes: int = DEFAULT_GROUP_BYTES) -> dict:
    """Convert on every rank of an initialised layout (runtime.parallel.init_parallel); returns convert.json.
    `model_kw`: extra build_thinker / TransformerConfig settings of the writing layout, e.g.
    `{"num_layers_in_first_pipeline_stage": 3}` (the deepstack layers must sit on the first stage).
    `group_bytes`: the most bytes filled and saved at once (0 = one save unit at a time)."""
    from ..model.language_model import current_layout
    from ..model.thinker import build_thinker

    started = time.perf_counter()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    dtype = resolve_dtype(dtype)
    staging = staging_path(out_dir)
    if _rank() == 0:
        (fresh_staging(out_dir) / CHECKPOINT).mkdir()
    _barrier()

    reader = SafetensorsReader(hf_dir)
    check_source_dtypes(reader)
    layout, coord = current_layout(), current_coord()
    with torch.device("meta"):  # no memory: each save group is materialised, filled, saved and freed in turn
        thinker = build_thinker(reader.config, dtype=dtype, use_te=use_te, perform_initialization=False,
                                use_cpu_initialization=True, **(model_kw or {}))
    built_s = time.perf_counter() - started
    log(f"convert rank {_rank()}: thinker built at tp{layout.tp} pp{layout.pp} ep{layout.ep} etp{layout.etp} "
        f"({dtype_name(dtype)}) in {built_s:.1f} s")
    mapper = Mapper(reader.config, layout, use_te=use_te, tconfig=thinker.config)
    unclaimed = mapper.unmapped_hf_keys(reader.keys(), prefixes=("thinker.",))
    if unclaimed:
        raise MappingError(f"{len(unclaimed)} thinker tensors are claimed by no mapping row: {unclaimed[:8]}")
    groups = save_groups(thinker, group_bytes)
    count = _group_count(groups)
    mapped_s, saved_s = _fill_and_save_groups(thinker, groups, count, mapper, reader, coord, staging, log)
    merge_started = time.perf_counter()
    if _rank() == 0:
        merged = merge_parts(staging / SAVE_PARTS, count, staging / CHECKPOINT)
        log(f"convert: {merged['keys']} checkpoint keys in {merged['files']} files from {count} save group(s)")
    _barrier()
    saved_s += time.perf_counter() - merge_started
    left = [k for k in reader.keys() if k.startswith(NOT_THINKER)]
    record = {
        "source": {"dir": str(hf_dir.resolve()), "manifest": manifest_digest(hf_dir)},
        "layout": {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "etp": layout.etp, "cp": layout.cp},
        "dtype": dtype_name(dtype),
        "use_te": bool(use_te),
        "parameters": parameter_counts(reader),
        "thinker_tensors_read": sum(1 for k in reader.keys() if k.startswith("thinker.")),
        "left_for_export": {"count": len(left), "tensors": left},
        "checkpoint": CHECKPOINT,
        "save_groups": count,
        "seconds": {"build": round(built_s, 3), "read_and_map": round(mapped_s, 3), "save": round(saved_s, 3)},
    }
    if _rank() == 0:
        record["hf_files"] = copy_hf_side_files(hf_dir, staging)
        record["seconds"]["total"] = round(time.perf_counter() - started, 3)
        (staging / CONVERT_JSON).write_text(json.dumps(record, indent=2))
        publish(staging, out_dir)
        log(f"converted {hf_dir} -> {out_dir}/{CHECKPOINT} ({dtype_name(dtype)}, tp{layout.tp} pp{layout.pp} "
            f"ep{layout.ep} etp{layout.etp}) in {record['seconds']['total']:.1f} s")
    _barrier()
    return record


def _group_count(groups: list) -> int:
    """Save calls are collective: every rank makes as many as the rank with the most groups (pipeline stages differ)."""
    if not torch.distributed.is_initialized():
        return len(groups)
    from ..runtime.parallel import reduction_device

    count = torch.tensor([len(groups)], device=reduction_device())  # convert on a GPU machine runs under NCCL
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return int(count.item())


def _fill_and_save_groups(thinker, groups, count: int, mapper, reader, coord, staging: Path,
                          log) -> tuple[float, float]:
    """Each group: materialised, filled from the HF tensors (one at a time), saved as a part, freed; `count` saves
    (a rank with fewer groups makes empty ones). Returns the seconds spent reading + mapping and saving."""
    plan = mapper.plan(reader.keys(), coord)

    def nbytes(binding):  # a tensor missing from the checkpoint is reported by the copy, naming it
        return sum(reader.nbytes(k) for k in binding.hf_keys if k in reader)

    mapped_s = saved_s = 0.0
    log(f"convert rank {_rank()}: saving the torch_dist checkpoint in {count} group(s), each as soon as it is read")
    with Progress(sum(nbytes(b) for b in plan), "B", log=log, label=f"convert rank {_rank()}: HF tensors read") as bar:
        copied = iter(range(1, len(plan) + 1))
        for index in range(count):
            units = groups[index] if index < len(groups) else []
            started = time.perf_counter()
            with materialised(thinker, units):
                copy_into_model(thinker, mapper, reader.get, reader.keys(), coord,
                                select=lambda name: save_unit(name) in units,
                                progress=lambda b: bar.update(nbytes(b), tensors=f"{next(copied)}/{len(plan)}"))
                mapped_s += time.perf_counter() - started
                started = time.perf_counter()
                save_part(thinker, units, staging / SAVE_PARTS, index)
                saved_s += time.perf_counter() - started
            reader.release()  # the file pages this group read leave the RSS with the maps
    log(f"convert rank {_rank()}: checkpoint saved in {saved_s:.1f} s ({count} save group(s))")
    return mapped_s, saved_s


def load_checkpoint(thinker: torch.nn.Module, ckpt_dir) -> None:
    """Fill a built thinker (any layout, after init_parallel) from a torch_dist checkpoint dir of the thinker's
    `sharded_state_dict()` (convert's or a training checkpoint). A tensor the model needs but the checkpoint lacks,
    or of another shape, is an error naming it."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.validation import StrictHandling

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "metadata.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a complete torch_dist checkpoint (no metadata.json)")
    wanted = thinker.sharded_state_dict()
    for value in wanted.values():
        if isinstance(value, ShardedTensorFactory):
            value.merge_fn = _merged_in_place(value.data, value.merge_fn)
    loaded = dist_checkpointing.load(wanted, str(ckpt_dir), strict=StrictHandling.RAISE_UNEXPECTED)
    # a training checkpoint's common state (iteration, scheduler, digest, ...) comes back beside the model's tensors
    thinker.load_state_dict({key: loaded[key] for key in wanted}, strict=True)


def _merged_in_place(data: torch.Tensor, merge: Callable) -> Callable:
    """A factory's merge that returns the model's own tensor when the load already filled it. mcore loads a
    factory's pieces in place, into the views its build made (SwiGLU fc1: the gate and up halves of the weight), and
    its merge then concatenates them into a NEW tensor; every merged copy is held until the load returns: for the
    released 30B-A3B, 48 layers x 128 experts' fc1 = 39 GB beside the 60 GB model, more than an 80 GB card holds."""

    from ..model.experts import same_view

    def merge_fn(pieces):
        if len(pieces) > 1 and all(same_view(piece, half)
                                   for piece, half in zip(pieces, torch.chunk(data, len(pieces), dim=0))):
            return data
        return merge(pieces)

    return merge_fn
