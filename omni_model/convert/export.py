"""Megatron-Core dist-checkpoint (any layout) -> a complete Qwen3-Omni HF checkpoint (thinker + talker + code2wav).

    export_to_hf(checkpoint_dir, source_hf_dir, out_dir, shard_size=5_000_000_000)

- Thinker tensors come from the checkpoint: the thinker is built at tp1/pp1/ep1 on the meta device (no memory) only
  to get its `sharded_state_dict()` (the checkpoint's keys and shard geometry); then one group at a time (a few load
  units of up to `group_bytes`; a unit is one LLM layer, one tower, the embedding, ...) real tensors are loaded with `dist_checkpointing.load` on that part of
  the sharded state dict (dist_checkpointing reshards from whatever TP/PP/EP layout the checkpoint was written at),
  mapped to HF names through the one declarative table (`mapping.Mapper.iter_mcore_to_hf`), cast to the source
  tensor's dtype and written, then freed.
- Talker tensors (`talker.*`) come from the `finetune_talker` checkpoint when one is given (`talker_checkpoint`:
  the talker built at tp1 on meta for its sharded state dict, loaded in one go (~3B parameters released), mapped by
  the talker's rows of the same Mapper), else they are copied like code2wav.
- Every other tensor (`code2wav.*`, the talker when untrained) is copied byte for byte from the source safetensors.
- MANIFEST.json records which parts were trained (`trained`: thinker llm / vision / audio, talker decoder /
  predictor / projections, code2wav never), read from the training runs' settings.json.
- The output is planned from the source safetensors headers (same names, dtypes, shapes; sharded by `shard_size`
  bytes like `save_pretrained`), its shard headers are written first and every tensor's bytes go to their planned
  offset: memory never holds more than one group, whatever the shard size.
- Non-weight files (config, generation config, tokenizer, chat template, preprocessor config) are copied; the result
  is written into a staging dir, gets the download stage's `MANIFEST.json` last, and is published atomically.

Strict: a thinker tensor the checkpoint lacks, a wrong shape, a model tensor no mapping row claims, or an HF tensor
that the source does not have (or that is never produced) fails with the tensor's name.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ..checkpoint_files import read_safetensors_header
from ..safetensors_writer import INDEX, ExportError, ShardedSafetensorsWriter, TensorEntry
from ..safetensors_writer import SAFETENSORS_DTYPES as _DTYPES

THINKER = "thinker."
# The checkpoint's model tensors live under these state-dict prefixes (anything else, e.g. `optimizer.*`, is not ours).
MODEL_PREFIXES = ("language_model.", "vision_model.", "audio_model.")
# Load at most ~this many checkpoint bytes at once (a unit is never split). Measured peak growth of the exporter is ~3x
# the bytes loaded at once (dist_checkpointing's read buffer + the loaded tensors + the source-dtype copy), so small
# models load in one go and big ones one unit (one LLM layer, one tower) at a time.
DEFAULT_GROUP_BYTES = 256 << 20

# ------------------------------------------------------------------------------------------------------------------
# safetensors headers: the plan of the source files and of the output shards
# ------------------------------------------------------------------------------------------------------------------
def tensor_entries(path: Path) -> Dict[str, TensorEntry]:
    """The tensors of one safetensors file with absolute byte ranges (the header read and checked by the download
    stage's reader; the data starts after the 8-byte header length and the header)."""
    header = read_safetensors_header(Path(path))
    with open(path, "rb") as handle:
        data_start = 8 + int.from_bytes(handle.read(8), "little")
    return {name: TensorEntry(name, h["dtype"], tuple(h["shape"]), Path(path), data_start + h["data_offsets"][0],
                              data_start + h["data_offsets"][1]) for name, h in header.items()}


def source_tensors(hf_dir: Path) -> Dict[str, TensorEntry]:
    """Every tensor of an HF checkpoint dir (sharded with an index, or single files)."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else sorted(p.name for p in hf_dir.glob("*.safetensors")))
    if not files:
        raise ExportError(f"{hf_dir} holds no *.safetensors")
    entries: Dict[str, TensorEntry] = {}
    for name in files:
        entries.update(tensor_entries(hf_dir / name))
    return entries


# ------------------------------------------------------------------------------------------------------------------
# the checkpoint side: the thinker's sharded state dict on meta, loaded group by group
# ------------------------------------------------------------------------------------------------------------------
def meta_thinker_sharded_state_dict(hf_config: dict, use_te: bool = False) -> dict:
    """The tp1/pp1/ep1 thinker's sharded state dict (model tensors only), built on the meta device: the checkpoint's
    keys and full shapes, no memory. Needs parallel_state initialised at tp1 (runtime.parallel.init_parallel())."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from ..model.thinker import build_thinker

    with torch.device("meta"):
        thinker = build_thinker(hf_config, dtype=torch.float32, use_te=use_te, perform_initialization=False,
                                use_cpu_initialization=True)
    return {k: v for k, v in thinker.sharded_state_dict().items() if not isinstance(v, ShardedObject)}


def _sharded_tensors(value) -> list:
    """The ShardedTensors a sharded-state-dict value stands for (a factory, e.g. SwiGLU fc1, builds several)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(value, ShardedTensor):
        return [value]
    if isinstance(value, ShardedTensorFactory):
        built = value.build()
        built = built.values() if isinstance(built, dict) else built
        return [t for b in built for t in _sharded_tensors(b)]
    raise ExportError(f"unexpected sharded state dict value {type(value).__name__}")


def check_checkpoint(sharded: dict, checkpoint_dir: Path, prefixes: tuple = MODEL_PREFIXES,
                     what: str = "thinker") -> Dict[str, torch.dtype]:
    """Every tensor the model (`what`) needs is in the checkpoint with the right global shape, and no model tensor
    (keys under `prefixes`) of the checkpoint is left over. Returns {checkpoint key: dtype}."""
    from megatron.core import dist_checkpointing

    stored = dist_checkpointing.load_tensors_metadata(str(checkpoint_dir))
    wanted = set()
    for name, value in sharded.items():
        for sh in _sharded_tensors(value):
            wanted.add(sh.key)
            if sh.key not in stored:
                raise ExportError(f"checkpoint {checkpoint_dir} lacks the {what} tensor {sh.key} "
                                  f"(state dict name {name}, shape {tuple(sh.global_shape)})")
            if tuple(stored[sh.key].global_shape) != tuple(sh.global_shape):
                raise ExportError(f"{sh.key} (state dict name {name}): checkpoint shape "
                                  f"{tuple(stored[sh.key].global_shape)} != model shape {tuple(sh.global_shape)}")
    extra = sorted(k for k in stored if k.startswith(prefixes) and k not in wanted)
    if extra:
        raise ExportError(f"checkpoint {checkpoint_dir} holds model tensors the {what} does not have: {extra[:5]}")
    return {k: v.dtype for k, v in stored.items()}


def _unit_of(name: str) -> str:
    """The unit a state-dict name is loaded with: up to its first index (`language_model.decoder.layers.3`,
    `vision_model.deepstack_mergers.1`), else its module (`language_model.embedding`)."""
    m = re.match(r"^(.*?\.\d+)\.", name)
    return m.group(1) if m else ".".join(name.split(".")[:2])


def load_units(sharded: dict) -> List[List[str]]:
    """State-dict names in load units, in model order. Units that share a checkpoint key are merged: mcore saves
    the towers' layers stacked under one key (a layer axis prepended), and a single-process load must read such a
    key whole (torch's ShardedTensor metadata cannot describe the other fragments of a 1-rank world), so a tower's
    layers load together; an LLM layer (its own keys) loads alone."""
    units: Dict[str, List[str]] = {}
    for name in sharded:
        units.setdefault(_unit_of(name), []).append(name)
    merged: List[Tuple[set, List[str]]] = []  # (checkpoint keys, state-dict names) per unit
    for names in units.values():
        keys = {sh.key for n in names for sh in _sharded_tensors(sharded[n])}
        for other in [m for m in merged if m[0] & keys]:
            merged.remove(other)
            keys, names = keys | other[0], other[1] + names
        merged.append((keys, names))
    return [names for _, names in merged]


def load_groups(sharded: dict, checkpoint_dir: Path, dtypes: Dict[str, torch.dtype],
                group_bytes: int = DEFAULT_GROUP_BYTES) -> Iterator[Dict[str, torch.Tensor]]:
    """Yield the thinker's state dict a few units at a time ({state-dict name: full tp1 tensor}, at most
    ~`group_bytes` unless one unit is larger), each batch read with one `dist_checkpointing.load` of its part of the
    sharded state dict, in the checkpoint's dtype."""
    batch: List[str] = []
    size = 0
    for names in load_units(sharded):
        nbytes = sum(_nbytes(sharded[n], dtypes) for n in names)
        if batch and size + nbytes > group_bytes:
            yield _load(batch, sharded, checkpoint_dir, dtypes)
            batch, size = [], 0
        batch += names
        size += nbytes
    if batch:
        yield _load(batch, sharded, checkpoint_dir, dtypes)


def _nbytes(value, dtypes) -> int:
    tensors = _sharded_tensors(value)
    return sum(math.prod(sh.local_shape) for sh in tensors) * dtypes[tensors[0].key].itemsize


def _load(names: List[str], sharded: dict, checkpoint_dir: Path, dtypes) -> Dict[str, torch.Tensor]:
    from megatron.core import dist_checkpointing

    request = {}
    for name in names:
        value = sharded[name]
        dtype = dtypes[_sharded_tensors(value)[0].key]
        # a fresh real tensor instead of the meta one (shallow copy: the meta sharded state dict stays reusable)
        request[name] = copy.copy(value)
        request[name].data = torch.empty(value.data.shape, dtype=dtype)
    return dist_checkpointing.load(request, str(checkpoint_dir), validate_access_integrity=False)


# ------------------------------------------------------------------------------------------------------------------
# the export
# ------------------------------------------------------------------------------------------------------------------
def export_thinker_tensors(checkpoint_dir: Path, hf_config: dict, *, use_te: bool = False,
                           group_bytes: int = DEFAULT_GROUP_BYTES) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, tensor in the checkpoint's dtype) of every thinker tensor of a dist checkpoint, a group at a time."""
    from ..model.transformer_config import Layout
    from .mapping import Mapper, RankCoord

    sharded = meta_thinker_sharded_state_dict(hf_config, use_te=use_te)
    dtypes = check_checkpoint(sharded, checkpoint_dir)
    mapper = Mapper(hf_config, Layout(), use_te=use_te)
    unclaimed = [n for n in sharded if not mapper.hf_keys_of(n, RankCoord())]
    if unclaimed:
        raise ExportError(f"thinker tensors no mapping row claims (they would be lost): {unclaimed[:5]}")
    for group in load_groups(sharded, checkpoint_dir, dtypes, group_bytes):
        yield from mapper.iter_mcore_to_hf({RankCoord(): group})


TALKER = "talker."
TALKER_MODEL_PREFIXES = ("language_model.", "code_predictor.", "text_projection.", "hidden_projection.")


def export_talker_tensors(checkpoint_dir: Path, hf_config: dict, *,
                          use_te: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, tensor in the checkpoint's dtype) of every talker tensor of a finetune_talker dist checkpoint."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from ..model.talker import build_talker
    from ..model.transformer_config import Layout
    from .mapping import RankCoord, talker_mapper

    with torch.device("meta"):
        talker = build_talker(hf_config, dtype=torch.float32, use_te=use_te, perform_initialization=False,
                              config_overrides={"use_cpu_initialization": True})
    sharded = {k: v for k, v in talker.sharded_state_dict().items() if not isinstance(v, ShardedObject)}
    dtypes = check_checkpoint(sharded, checkpoint_dir, TALKER_MODEL_PREFIXES, "talker")
    loaded = _load(list(sharded), sharded, checkpoint_dir, dtypes)
    state = {TALKER + name: tensor for name, tensor in loaded.items() if not name.endswith("_extra_state")}
    yield from talker_mapper(hf_config, Layout()).iter_mcore_to_hf({RankCoord(): state})


def trained_parts(checkpoint_dir: Path, talker_checkpoint: Optional[Path]) -> dict:
    """Which parts of the export a training run changed, from the runs' settings.json beside their checkpoints
    (a converted checkpoint, `train.iters` 0, trained nothing): {"thinker": {part: true | false | "lora"},
    "talker": {part: bool} or false, "code2wav": false}."""
    from ..train.checkpointing import ITER_DIR

    def settings_of(checkpoint):
        if checkpoint is None or not ITER_DIR.match(Path(checkpoint).name):
            return None
        path = Path(checkpoint).parent / "settings.json"
        return json.loads(path.read_text()) if path.is_file() else None

    thinker = dict.fromkeys(("llm", "vision", "audio"), False)
    run = settings_of(checkpoint_dir)
    if run is not None:
        train = run["train"]
        lora = train.get("lora") or {}
        for part in thinker:
            if lora.get("enabled"):
                targets = {"llm": {"attention", "experts", "dense_mlp"}, "vision": {"vision"}, "audio": {"audio"}}
                thinker[part] = "lora" if targets[part] & set(lora.get("targets", ())) else False
            else:
                thinker[part] = not train.get(f"freeze_{part}", False)
    talker_run = settings_of(talker_checkpoint)
    talker = False
    if talker_run is not None:
        talker = {part: not talker_run["talker"].get(f"freeze_{part}", False)
                  for part in ("decoder", "predictor", "projections")}
    return {"thinker": thinker, "talker": talker, "code2wav": False}


def export_to_hf(checkpoint_dir, source_hf_dir, out_dir, *, shard_size: int = 5_000_000_000, use_te: bool = False,
                 group_bytes: int = DEFAULT_GROUP_BYTES, log: Callable[[str], None] = print,
                 talker_checkpoint=None) -> dict:
    """Write `out_dir`: the thinker from `checkpoint_dir`, the talker from `talker_checkpoint` (a finetune_talker
    checkpoint; None: the source's talker), everything else from `source_hf_dir`. Returns a summary."""
    from ..checkpoint_files import write_manifest
    from ..runtime.logs import Progress
    from ..runtime.publish import fresh_staging, publish
    from .checkpoint import copy_hf_side_files, manifest_digest

    checkpoint_dir, source_hf_dir, out_dir = Path(checkpoint_dir), Path(source_hf_dir), Path(out_dir)
    _single_process_layout()
    hf_config = json.loads((source_hf_dir / "config.json").read_text())
    source = source_tensors(source_hf_dir)
    thinker = [e for e in source.values() if e.name.startswith(THINKER)]
    talker_trained = talker_checkpoint is not None
    from_talker = [e for e in source.values() if talker_trained and e.name.startswith(TALKER)]
    copied = [e for e in source.values() if not e.name.startswith(THINKER) and not (talker_trained
                                                                                  and e.name.startswith(TALKER))]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = fresh_staging(out_dir)

    with ShardedSafetensorsWriter(staging, source.values(), shard_size) as writer:
        total = sum(e.nbytes for e in thinker)
        # a line per load group's worth of bytes (at least every tenth): the groups are loaded as the tensors are
        with Progress(total, "B", log=log, label="export thinker", every=min(group_bytes, total / 10)) as bar:
            for count, (name, tensor) in enumerate(export_thinker_tensors(checkpoint_dir, hf_config, use_te=use_te,
                                                                         group_bytes=group_bytes), 1):
                if name not in source:
                    raise ExportError(f"{name}: mapped from the checkpoint, but the source checkpoint "
                                      f"{source_hf_dir} has no such tensor")
                writer.write(name, tensor.to(_DTYPES[source[name].dtype]))  # the source dtype (round to nearest)
                bar.update(source[name].nbytes, tensors=f"{count}/{len(thinker)}")
        if talker_trained:
            _write_talker(writer, Path(talker_checkpoint), hf_config, source, from_talker, use_te, log)
        for entry in copied:
            writer.copy_from(entry)
        log(f"export: {len(copied)} {'code2wav' if talker_trained else 'talker/code2wav'} tensors copied unchanged")
        writer.finish()

    copy_hf_side_files(source_hf_dir, staging)
    trained = trained_parts(checkpoint_dir, talker_checkpoint)
    write_manifest(staging, {"kind": "export", "checkpoint": str(checkpoint_dir.resolve()),
                             "talker_checkpoint": str(Path(talker_checkpoint).resolve()) if talker_trained else None,
                             "trained": trained,
                             "source_manifest": manifest_digest(source_hf_dir)})  # last: its presence = complete
    publish(staging, out_dir)
    summary = {"thinker_tensors": len(thinker), "talker_tensors": len(from_talker), "copied_tensors": len(copied),
               "shards": len(set(writer.weight_map.values())), "total_size": writer.total_size}
    log(f"export: {out_dir}: {summary}")
    return summary


def _write_talker(writer, talker_checkpoint: Path, hf_config: dict, source: dict, expected: list, use_te: bool,
                  log) -> None:
    """The talker tensors from its checkpoint, each in its source dtype; every source talker tensor exactly once."""
    written = set()
    for name, tensor in export_talker_tensors(talker_checkpoint, hf_config, use_te=use_te):
        if name not in source:
            raise ExportError(f"{name}: mapped from the talker checkpoint, but the source checkpoint has no such tensor")
        writer.write(name, tensor.to(_DTYPES[source[name].dtype]))
        written.add(name)
    missing = sorted({e.name for e in expected} - written)
    if missing:
        raise ExportError(f"talker tensors of the source that the talker checkpoint does not produce: {missing[:5]}")
    log(f"export: {len(written)} talker tensors from {talker_checkpoint}")


def _single_process_layout() -> None:
    """The exporter is one process at tp1/pp1/ep1 (dist_checkpointing reshards any layout to it)."""
    from megatron.core import parallel_state as ps

    from ..runtime.parallel import init_parallel

    if torch.distributed.is_initialized() and torch.distributed.get_world_size() != 1:
        raise ExportError("export runs in one process (the checkpoint is resharded on load), not under torchrun")
    if not (ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() == 1
            and ps.get_pipeline_model_parallel_world_size() == 1 and ps.get_expert_model_parallel_world_size() == 1):
        init_parallel()


# ------------------------------------------------------------------------------------------------------------------
# LoRA: a training checkpoint of adapters (train.lora) -> merged HF checkpoint and/or a PEFT adapter folder
# ------------------------------------------------------------------------------------------------------------------
LORA_MODES = ("merged", "adapter", "both")


def hf_base_digest(hf_dir: Path) -> str:
    """The base digest of an HF model dir, as a LoRA checkpoint records it (checkpointing.base_digest: the download
    stage's MANIFEST digest)."""
    from .checkpoint import manifest_digest

    digest = manifest_digest(hf_dir)
    if digest is None:
        raise ExportError(f"{hf_dir} has no MANIFEST.json: cannot tell whether the LoRA adapters were trained on it")
    return digest


def lora_deltas(adapters: Dict[str, torch.Tensor], spec, hf_config: dict, *,
                use_te: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF tensor name, scaling * B A in fp32) of every adapted weight, one adapted module at a time: the delta is
    formed in our layout (what merge_lora adds to the base weight) and sent through the one mapping, like a weight."""
    from ..model.lora import GroupedLora, LoraError, inject_lora, lora_modules, module_delta_weight
    from ..model.thinker import build_thinker
    from ..model.transformer_config import Layout
    from .mapping import Mapper, RankCoord

    with torch.device("meta"):
        thinker = build_thinker(hf_config, dtype=torch.float32, use_te=use_te, perform_initialization=False,
                                use_cpu_initialization=True)
        inject_lora(thinker, spec, seed=0, initialise=False)
    mapper = Mapper(hf_config, Layout(), use_te=use_te)
    used = set()
    for name, module in lora_modules(thinker):
        for pname, _, _ in list(module.adapters()):
            key = f"{name}.{pname}"
            if key not in adapters:
                raise LoraError(f"the adapter checkpoint lacks {key}: it was trained with other train.lora targets")
            setattr(module, pname, torch.nn.Parameter(adapters[key].float(), requires_grad=False))
            used.add(key)
        delta = module_delta_weight(module)
        if isinstance(module, GroupedLora):
            group = {f"{name}.weight{e}": delta[e] for e in range(delta.shape[0])}
        else:
            group = {f"{name}.weight": delta}
        yield from mapper.iter_mcore_to_hf({RankCoord(): group})
    left = sorted(set(adapters) - used)
    if left:
        raise LoraError(f"adapters the model has no place for: {left[:5]}")


def write_peft_adapter(adapters: Dict[str, torch.Tensor], spec, out_dir: Path, source_hf_dir: Path) -> dict:
    """A PEFT folder (adapter_config.json + adapter_model.safetensors) for transformers' full Qwen3-Omni model,
    published atomically."""
    from safetensors.torch import save_file

    from ..model.lora import to_peft
    from ..runtime.publish import fresh_staging, publish

    state, config = to_peft(adapters, spec, module_prefix="thinker.model.")
    config.base_model_name_or_path = str(source_hf_dir)
    staging = fresh_staging(out_dir)
    config.save_pretrained(str(staging))
    save_file({k: v.contiguous() for k, v in state.items()}, str(staging / "adapter_model.safetensors"))
    publish(staging, out_dir)
    return {"adapter_tensors": len(state), "adapter_bytes": sum(v.numel() * v.element_size() for v in state.values())}


def _read_tensor(entry: TensorEntry) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(entry.file), "pt") as f:
        return f.get_tensor(entry.name)


def write_merged(adapters: Dict[str, torch.Tensor], spec, source_hf_dir: Path, out_dir: Path, *,
                 shard_size: int, use_te: bool = False, provenance: dict, log: Callable[[str], None] = print) -> dict:
    """The source HF checkpoint with every adapted weight replaced by W + scaling * B A (fp32 sum, cast to the
    source dtype); every other tensor copied byte for byte. Streamed: one adapted module's deltas at a time."""
    from ..checkpoint_files import write_manifest
    from ..runtime.publish import fresh_staging, publish
    from .checkpoint import copy_hf_side_files

    hf_config = json.loads((source_hf_dir / "config.json").read_text())
    source = source_tensors(source_hf_dir)
    staging = fresh_staging(out_dir)
    merged = set()
    with ShardedSafetensorsWriter(staging, source.values(), shard_size) as writer:
        for name, delta in lora_deltas(adapters, spec, hf_config, use_te=use_te):
            entry = source.get(name)
            if entry is None:
                raise ExportError(f"{name}: an adapted weight that the source checkpoint {source_hf_dir} lacks")
            if tuple(delta.shape) != entry.shape:
                raise ExportError(f"{name}: adapter delta {tuple(delta.shape)} != source {entry.shape}")
            writer.write(name, (_read_tensor(entry).float() + delta).to(_DTYPES[entry.dtype]))
            merged.add(name)
        for entry in source.values():
            if entry.name not in merged:
                writer.copy_from(entry)
        writer.finish()
    copy_hf_side_files(source_hf_dir, staging)
    write_manifest(staging, dict(provenance, kind="export", lora="merged"))
    publish(staging, out_dir)
    log(f"export: {len(merged)} weights merged with their adapters, {len(source) - len(merged)} copied unchanged")
    return {"merged_tensors": len(merged), "copied_tensors": len(source) - len(merged),
            "shards": len(set(writer.weight_map.values())), "total_size": writer.total_size}


def export_lora(checkpoint_dir, source_hf_dir, *, mode: str, merged_dir=None, adapter_dir=None,
                shard_size: int = 5_000_000_000, use_te: bool = False, log: Callable[[str], None] = print) -> dict:
    """Export a LoRA training checkpoint against the base it was trained on (refused otherwise): `mode` merged
    (merged_dir), adapter (adapter_dir, a PEFT folder) or both."""
    from ..model.lora import LoraSpec, full_adapters_from_checkpoint
    from ..train.checkpointing import check_base, lora_record
    from .checkpoint import manifest_digest

    if mode not in LORA_MODES:
        raise ExportError(f"export.lora = {mode!r}: choose one of {list(LORA_MODES)}")
    checkpoint_dir, source_hf_dir = Path(checkpoint_dir), Path(source_hf_dir)
    record = lora_record(checkpoint_dir)
    if record is None:
        raise ExportError(f"{checkpoint_dir} holds no LoRA adapters (with train.iters 0 nothing was trained: the "
                          f"export is the converted model, export.lora: merged)")
    check_base(record, hf_base_digest(source_hf_dir), f"export of {checkpoint_dir} against {source_hf_dir}")
    _single_process_layout()
    spec = LoraSpec.of(record["lora"])
    adapters = full_adapters_from_checkpoint(checkpoint_dir)
    log(f"export: {len(adapters)} adapter tensors (rank {spec.rank}, alpha {spec.alpha}, targets "
        f"{list(spec.targets)}) from {checkpoint_dir}")
    summary = {}
    if mode in ("adapter", "both"):
        summary["adapter"] = write_peft_adapter(adapters, spec, Path(adapter_dir), source_hf_dir)
    if mode in ("merged", "both"):
        provenance = {"checkpoint": str(checkpoint_dir.resolve()), "source_manifest": manifest_digest(source_hf_dir)}
        summary["merged"] = write_merged(adapters, spec, source_hf_dir, Path(merged_dir), shard_size=shard_size,
                                         use_te=use_te, provenance=provenance, log=log)
    return summary
