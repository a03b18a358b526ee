"""What one training run is: paths + the `train`, `parallel`, `data` config sections, checked before any rank starts.

The finetune rule writes these settings as JSON and starts `python -m omni_model.train --settings FILE` under torchrun;
the same checks run in the Snakefile at parse time (`check_config`), so a bad layout stops the plan, not a job.
No torch import here: the Snakefile imports this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Tuple

from ..configs import thinker_config_of
from ..layout import Layout, LayoutError
from ..schema import DataConfig, LoraConfig, ParallelConfig, SectionError, TrainConfig

# train.* keys that do not change the numbers a run produces (how often it logs, saves or evaluates, where it runs,
# how the loss is chunked: only the order of fp32 sums, like a layout change): left out of the settings digest, so
# changing them resumes instead of starting over.
NOT_IN_DIGEST = ("log_interval", "eval_interval", "eval_iters", "save_interval", "keep_checkpoints", "gpus_per_node",
                 "cpu_procs", "nnodes", "rdzv_endpoint", "peak_tflops", "gpu_memory_gib", "loss_chunk_tokens")

# data.* keys of the run: the encoder settings the shards were written with (the finetune rule passes these); they,
# not the data section's other keys (where the raw data is, how the data stages run), are part of the digest.
DATA_IN_DIGEST = ("max_seq_len", "use_audio_in_video", "video_fps", "video_max_frames", "video_min_pixels",
                  "video_max_pixels")
LORA_TARGETS = ("attention", "experts", "dense_mlp", "vision", "audio")


class LoraError(ValueError):
    """A LoRA setting or adapter checkpoint that cannot work; the message names it."""


@dataclass(frozen=True)
class LoraSpec:
    """An enabled train.lora section (defaults: config/schema.yaml's, through LoraConfig)."""
    rank: int = LoraConfig.rank
    alpha: float = LoraConfig.alpha
    dropout: float = LoraConfig.dropout
    targets: Tuple[str, ...] = LoraConfig.targets

    def __post_init__(self):
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown:
            raise LoraError(f"train.lora.targets: unknown {unknown}; choose from {list(LORA_TARGETS)}")
        if not self.targets:
            raise LoraError("train.lora.targets is empty: nothing to adapt")
        if int(self.rank) < 1:
            raise LoraError(f"train.lora.rank = {self.rank} must be >= 1")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise LoraError(f"train.lora.dropout = {self.dropout} must be in [0, 1)")

    @classmethod
    def of(cls, lora) -> Optional["LoraSpec"]:
        """The spec of a `train.lora` section (LoraConfig or mapping), or None when LoRA is off (absent, null or
        enabled: false)."""
        try:
            lora = LoraConfig.of(lora or {})
        except SectionError as error:
            raise LoraError(str(error)) from None
        if not lora.enabled:
            return None
        return cls(rank=int(lora.rank), alpha=float(lora.alpha), dropout=float(lora.dropout),
                   targets=tuple(lora.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class SettingsError(ValueError):
    """A training setting that cannot work; the message names the key."""


@dataclass
class TrainSettings:
    """One run's settings. `train`, `parallel`, `data`: the config sections, typed (omni_model.schema: the schema's
    keys, types and defaults); a mapping given here is validated by the schema and filled with its defaults."""
    hf_dir: str  # config.json, tokenizer, chat template, preprocessor config of the model being trained
    init_checkpoint: str  # torch_dist checkpoint to start from (convert's output)
    shards: str  # Energon dataset (train/val splits)
    train_dir: str  # iter_NNNNNNN/ checkpoints, latest, metrics.jsonl, tb/
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # the encoder settings of DATA_IN_DIGEST matter here
    use_te: bool = False

    def __post_init__(self):
        self.train, self.parallel, self.data = typed_sections(self.train, self.parallel, self.data)

    # -- files ------------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path) -> "TrainSettings":
        return cls(**json.loads(Path(path).read_text()))

    def dump(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.as_dict(), indent=1, sort_keys=True) + "\n")

    def as_dict(self) -> dict:
        return {**asdict(self), "train": self.train.as_dict(), "parallel": self.parallel.as_dict(),
                "data": self.data.as_dict()}

    @property
    def metrics_path(self) -> Path:
        return Path(self.train_dir) / "metrics.jsonl"

    # -- derived ----------------------------------------------------------------------------------------------------
    @property
    def on_gpu(self) -> bool:
        return self.train.gpus_per_node > 0

    @property
    def data_workers(self) -> int:
        """Loader processes per rank: media decoding + encoding off the training process on GPU (the step waits
        for the batch otherwise); none on CPU, where the cores are the trainer's."""
        workers = self.train.data_workers
        return (4 if self.on_gpu else 0) if workers is None else int(workers)

    @property
    def world_size(self) -> int:
        per_node = self.train.gpus_per_node if self.on_gpu else self.train.cpu_procs
        return per_node * self.train.nnodes

    @property
    def layout(self) -> Layout:
        return Layout.of(self.parallel.as_dict(), self.world_size, distributed_optimizer=self.on_gpu)

    @property
    def lora(self) -> Optional[LoraSpec]:
        """The LoRA spec of this run, or None for full fine-tuning."""
        return LoraSpec.of(self.train.lora)

    @property
    def hf_config(self) -> Optional[dict]:
        path = Path(self.hf_dir) / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def digest(self) -> str:
        """Fingerprint of everything that decides the loss sequence: the trajectory-changing train keys, the data
        settings, the TE decision, the starting checkpoint's files and the shards' files. Not the layout (a run may
        resume at another layout) and not the logging/saving intervals."""
        train = {k: v for k, v in sorted(self.train.as_dict().items()) if k not in NOT_IN_DIGEST}
        if not train["lora"]["enabled"]:
            del train["lora"]  # full fine-tuning: the digest of the settings before LoRA existed
        data = {key: getattr(self.data, key) for key in DATA_IN_DIGEST}
        payload = {"train": train, "data": data, "use_te": self.use_te,
                   "init_checkpoint": files_fingerprint(Path(self.init_checkpoint)),
                   "shards": files_fingerprint(Path(self.shards))}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> None:
        check_config(self.train, self.parallel, self.world_size, self.hf_config, self.use_te)


def files_fingerprint(root: Path) -> list:
    """(relative name, size, mtime) of every file under root: cheap for a 60 GB checkpoint, and any rewrite shows."""
    if not root.exists():
        return []
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*") if p.is_file())


def context_parallel_problem(parallel: dict, train: Optional[dict] = None, use_te: bool = False) -> Optional[str]:
    """The one rule about parallel.cp (the workflow's config check and the training checks both ask it): CP splits
    each packed sequence over the CP ranks (model.context_parallel) on our attention, so it needs packed rows and
    the local spec (the TE spec's attention would cut the already cut positions again)."""
    cp = parallel.get("cp", 1)
    if cp > 1 and not TrainConfig.of(train or {}).packing:
        return (f"parallel.cp = {cp} needs train.packing: true (context parallelism splits each packed sequence "
                f"over the CP ranks by its boundaries)")
    if cp > 1 and use_te:
        return (f"parallel.cp = {cp} runs on the local attention spec: set model.use_te: false (our CP split hands "
                f"the layers positions already cut per rank, which TE's CP attention would cut again)")
    return None


def typed_sections(train, parallel, data=None) -> tuple:
    """(TrainConfig, ParallelConfig, DataConfig) of mappings or typed sections; the schema's refusal as SettingsError."""
    try:
        return TrainConfig.of(train), ParallelConfig.of(parallel), DataConfig.of(data)
    except SectionError as error:
        raise SettingsError(str(error)) from None


def check_config(train, parallel, world_size: Optional[int] = None, hf_config: Optional[dict] = None,
                 use_te: bool = False) -> None:
    """Refuse layouts and batch settings that cannot train, naming the key. `train`, `parallel`: the sections, typed
    or as mappings. `world_size` None: derive it. `hf_config` (the model's config.json dict), when known: also the
    pipeline split against its decoder layers and deepstack features."""
    train, parallel, _ = typed_sections(train, parallel)
    problem = context_parallel_problem(parallel.as_dict(), train, use_te)
    if problem:
        raise SettingsError(problem)
    if world_size is None:
        per_node = train.gpus_per_node if train.gpus_per_node > 0 else train.cpu_procs
        world_size = per_node * train.nnodes
    try:
        layout = Layout.of(parallel.as_dict(), world_size)
        if hf_config is not None:
            check_pipeline_split(layout, hf_config)
    except LayoutError as error:
        raise SettingsError(str(error)) from None
    dp = layout.dp
    if (dp * layout.tp * layout.cp) % (layout.ep * layout.etp):  # mcore folds CP into the expert data parallelism
        raise SettingsError(
            f"parallel.ep x etp = {layout.ep * layout.etp} must divide data-parallel x tp x cp = "
            f"{dp * layout.tp * layout.cp} ({world_size} ranks)")
    per_step = train.micro_batch_size * dp
    if train.global_batch_size % per_step:
        raise SettingsError(
            f"train.global_batch_size = {train.global_batch_size} is not a multiple of train.micro_batch_size x "
            f"data-parallel size = {train.micro_batch_size} x {dp}")
    if train.iters and train.lr_warmup_iters >= train.iters and train.lr_decay_style != "constant":
        raise SettingsError(
            f"train.lr_warmup_iters = {train.lr_warmup_iters} must be below train.iters = {train.iters} "
            f"(or use train.lr_decay_style: constant)")
    if train.min_lr > train.lr:
        raise SettingsError(f"train.min_lr = {train.min_lr} is above train.lr = {train.lr}")
    try:
        lora = LoraSpec.of(train.lora)
    except LoraError as error:
        raise SettingsError(str(error)) from None
    if lora is not None:
        if any(getattr(train, f"freeze_{part}") for part in ("llm", "vision", "audio")):
            raise SettingsError("train.lora freezes the whole base model itself: leave train.freeze_llm / "
                                "freeze_vision / freeze_audio false and choose what trains with train.lora.targets")
    if train.freeze_llm and train.freeze_vision and train.freeze_audio and train.iters:
        raise SettingsError("train.freeze_llm, freeze_vision and freeze_audio are all true: nothing to train")


def check_pipeline_split(layout: Layout, hf_config: dict) -> None:
    """The layout's pipeline split of the model's decoder layers, with the deepstack layers on the first stage."""
    thinker = thinker_config_of(hf_config)
    num_layers = thinker["text_config"]["num_hidden_layers"]
    deepstack = len((thinker.get("vision_config") or {}).get("deepstack_visual_indexes") or ())
    layout.check_deepstack(num_layers, deepstack)
