"""The `finetune_talker` run: the talker trained on the spoken answers, its inputs built by the tuned thinker (frozen).

    python -m omni_model.train.talker_run --settings settings.json     # under torchrun (omni_model.runtime.launch)

The run is train.loop's (resume-or-start, mcore's schedule, distributed optimizer on GPU, evaluation, atomic
checkpoints with exact resume, metrics.jsonl / TensorBoard) with the talker's `Stage`:

* build: the thinker at this rank's layout from the checkpoint the thinker run's `latest` names (`init_checkpoint`),
  frozen in eval mode; the talker from the HF checkpoint's `talker.*` tensors (`talker_init`, convert.mapping's
  talker rows), the `train_talker.freeze_*` parts frozen, then mcore DDP + optimizer + scheduler
  (train.talker_step.build_talker_training, the thinker's wrap_for_training);
* data: the shards' conversations that carry speech (the others are skipped by the task encoder before decoding),
  unpacked, `train_talker.micro_batch_size` conversations per micro-batch;
* forward step: thinker micro-batch -> TalkerBatch (train.talker_inputs: generate's exact talker input) ->
  train.talker_step.talker_loss (first group CE incl. EOS + predictor_weight x groups 1..15 CE);
* metrics: talker positions per second, first / predictor loss terms, model FLOPs of the talker (trained) and of the
  thinker's first accept_hidden_layer layers (forward only).

Settings: `TalkerSettings` = TrainSettings (the thinker checkpoint as init_checkpoint; `train` = the train section
with the talker's own keys of `train_talker` in place) + `talker_init` + the typed `train_talker` section.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..schema import section_class
from .settings import SettingsError, TrainSettings, files_fingerprint

TalkerTrainConfig = section_class("train_talker", "TalkerTrainConfig")
# train_talker keys that replace the train section's in the talker run's TrainConfig
SHARED_KEYS = ("iters", "lr", "min_lr", "lr_warmup_iters", "lr_decay_style", "weight_decay", "micro_batch_size",
               "global_batch_size", "moe_aux_loss_coeff", "eval_interval", "eval_iters", "save_interval",
               "keep_checkpoints", "log_interval", "seed")
# which talker parameters each freeze switch addresses (names as in Qwen3OmniTalker.named_parameters())
TALKER_PARTS = {"decoder": ("language_model.",), "predictor": ("code_predictor.",),
                "projections": ("text_projection.", "hidden_projection.")}


def talker_train_section(train: dict, train_talker) -> dict:
    """The TrainConfig mapping of the talker run: the train section, the talker's keys in place, no packing (one
    conversation per row: generate's layout), no LoRA and no thinker freeze switches (the thinker is frozen whole)."""
    talker = TalkerTrainConfig.of(train_talker)
    section = {k: v for k, v in dict(train).items()}
    section.update({key: getattr(talker, key) for key in SHARED_KEYS if getattr(talker, key) is not None})
    section.update(packing=False, lora={"enabled": False}, freeze_llm=False, freeze_vision=False, freeze_audio=False,
                   lr_mult_vision=1.0, lr_mult_audio=1.0)
    return section


@dataclass
class TalkerSettings(TrainSettings):
    talker_init: str = ""  # HF checkpoint dir whose talker.* tensors the talker starts from
    talker: TalkerTrainConfig = field(default_factory=TalkerTrainConfig)

    def __post_init__(self):
        super().__post_init__()
        self.talker = TalkerTrainConfig.of(self.talker)

    def as_dict(self) -> dict:
        return {**super().as_dict(), "talker": self.talker.as_dict()}

    def digest(self) -> str:
        payload = {"thinker_run": super().digest(), "talker": self.talker.as_dict(),
                   "talker_init": files_fingerprint(Path(self.talker_init))}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> None:
        super().validate()
        check_talker_layout(self.parallel)
        frozen = [p for p in TALKER_PARTS if getattr(self.talker, f"freeze_{p}")]
        if len(frozen) == len(TALKER_PARTS) and self.train.iters:
            raise SettingsError("train_talker.freeze_decoder, freeze_predictor and freeze_projections are all true: "
                                "nothing to train")


def layout_reason(parallel) -> str:
    """Why the talker cannot train at this layout ("" = it can): it runs without pipeline or context parallelism
    (model.talker). Not a refusal of the run: the thinker trains at pp / cp and the talker is passed through, saying so."""
    parallel = parallel if isinstance(parallel, dict) else parallel.as_dict()
    for key in ("pp", "cp"):
        if parallel.get(key, 1) > 1:
            return (f"parallel.{key} = {parallel[key]}: the talker trains without "
                    f"{'pipeline' if key == 'pp' else 'context'} parallelism yet")
    return ""


def check_talker_layout(parallel) -> None:
    reason = layout_reason(parallel)
    if reason:
        raise SettingsError(reason)


def check_talker_plan(config: dict) -> None:
    """The plan-time check (rules/finetune.smk) of a talker run the config asks for: its train settings (batch sizes
    against the layout, warmup, LR). Raises SettingsError naming the key. A layout with pp / cp trains no talker."""
    from .settings import check_config

    talker = TalkerTrainConfig.of(config.get("train_talker", {}))
    lora = (config.get("train", {}).get("lora") or {}).get("enabled")
    if talker.iters == 0 or lora or layout_reason(config.get("parallel", {})):
        return  # not trained: finetune_talker says why in its log and on the console
    try:
        check_config(talker_train_section(config.get("train", {}), talker), config.get("parallel", {}))
    except SettingsError as error:
        message = str(error)
        for key in SHARED_KEYS:  # the talker run's value of these keys is train_talker's
            if getattr(talker, key) is not None:
                message = message.replace(f"train.{key} ", f"train_talker.{key} ")
        raise SettingsError(f"{message} (finetune_talker)") from None


def not_trained_reason(settings: TalkerSettings, thinker_train) -> str:
    """Why the talker is not trained with these settings ("" = it is): iters 0, a layout with pp / cp, no spoken
    answer in the shards, or a LoRA thinker run (a thinker of adapters is not read here yet)."""
    from ..data.speech import read_speech_settings

    if settings.talker.iters == 0:
        return "train_talker.iters is 0"
    if layout_reason(settings.parallel):
        return layout_reason(settings.parallel)
    if read_speech_settings(Path(settings.shards)) is None or not spoken_train_samples(Path(settings.shards)):
        return f"the train split of the shards at {settings.shards} holds no spoken answer"
    if (dict(thinker_train).get("lora") or {}).get("enabled"):
        return "train.lora: the talker is not trained on a LoRA thinker yet"
    return ""


# ---------------------------------------------------------------------------------------------------------- build
def freeze_talker(talker, section) -> dict:
    """requires_grad False on the frozen talker parts; {part: (trainable, frozen)} parameter counts."""
    from .build import freeze_parts

    return freeze_parts(talker, TALKER_PARTS, {part: bool(getattr(section, f"freeze_{part}")) for part in TALKER_PARTS})


def frozen_thinker(settings: TalkerSettings):
    """The tuned thinker of this rank, eval mode, no grads (its weights from settings.init_checkpoint)."""
    from ..model.thinker import build_thinker
    from .build import training_dtype
    from .checkpointing import load_model_weights, lora_record

    if lora_record(Path(settings.init_checkpoint)) is not None:
        raise SettingsError(f"{settings.init_checkpoint} is a LoRA checkpoint: finetune_talker reads a full thinker "
                            f"checkpoint (train.lora with train_talker.iters > 0 is not supported yet)")
    thinker = build_thinker(settings.hf_dir, dtype=training_dtype(settings), use_te=settings.use_te)
    load_model_weights(thinker, settings.init_checkpoint)
    thinker.eval()
    for param in thinker.parameters():
        param.requires_grad_(False)
    return thinker


class TalkerRunStep:
    """mcore's forward_step_func of the talker run: the next thinker micro-batch -> TalkerBatch (the frozen thinker)
    -> the talker's loss; counts what the talker saw (positions, frames) for the metrics."""

    def __init__(self, settings: TalkerSettings):
        from .talker_inputs import TalkerBatches
        from .talker_step import TalkerForwardStep

        # rows padded to a multiple of the TP size (sequence parallelism splits them); set once the layout is up
        self.batches = TalkerBatches(settings.hf_dir, speaker=settings.talker.speaker)
        self.loss_step = TalkerForwardStep(settings.talker.predictor_weight)
        self.thinker = None  # set by the build
        self.seen = {"positions": 0, "frames": 0, "rows": 0}

    def __call__(self, data_iterator, model):
        from megatron.core import parallel_state

        batch = next(data_iterator)
        self.batches.pad_to_multiple = parallel_state.get_tensor_model_parallel_world_size()
        talker_batch = self.batches(self.thinker, batch)
        if talker_batch is None:
            raise ValueError(f"a talker micro-batch without spoken answers ({batch.sample_ids}): the spoken-only task "
                             f"encoder should have skipped them")
        self.seen["positions"] += int(talker_batch.labels.numel())
        self.seen["frames"] += int(talker_batch.frame_codes.shape[0])
        self.seen["rows"] += int(talker_batch.labels.shape[0])
        return self.loss_step(iter([talker_batch]), model)

    def take(self) -> dict:
        seen, self.seen = self.seen, {"positions": 0, "frames": 0, "rows": 0}
        return seen


def build_talker_run(settings: TalkerSettings, step: TalkerRunStep, load_initial_weights: bool):
    from ..convert.mapping import load_hf_into_talker
    from .talker_step import build_talker_training

    step.thinker = frozen_thinker(settings)

    def load_and_freeze(talker):
        if load_initial_weights:
            load_hf_into_talker(talker, settings.talker_init)
        counts = freeze_talker(talker, settings.talker)
        print(f"[finetune_talker] talker parameters (trainable, frozen): {counts}", flush=True)

    return build_talker_training(settings, load_weights=load_and_freeze)


# ----------------------------------------------------------------------------------------------------------- data
def spoken_task_encoder(settings: TalkerSettings):
    """The run's task encoder, keeping only conversations with a spoken answer (the others are skipped before their
    media are decoded, and not counted as skipped samples: they are not the talker's data)."""
    from megatron.energon import SkipSample

    from ..data.speech import speech_turns
    from .data import task_encoder

    import functools

    encoder = task_encoder(settings)
    encode = encoder.encode_sample

    @functools.wraps(encode)  # keeps Energon's @stateless marking of the method it wraps
    def encode_spoken(sample):
        if not speech_turns(sample.record):
            raise SkipSample()
        return encode(sample)

    encoder.encode_sample = encode_spoken
    return encoder


def spoken_train_samples(shards: Path) -> int:
    """Samples of the train split with a spoken answer, from the tars' member names (headers only): the spoken-only
    loader would skip forever over a split without any."""
    import tarfile

    from ..data.shards import split_tars

    keys = set()
    for path in split_tars(Path(shards), "train"):
        with tarfile.open(path) as tar:
            keys.update(name.split(".", 1)[0] for name in tar.getnames() if ".speech" in name)
    return len(keys)


def check_spoken_shards(settings: TalkerSettings) -> None:
    from .data import check_shards

    check_shards(settings)
    if not spoken_train_samples(Path(settings.shards)):
        raise SettingsError(f"the train split of {settings.shards} holds no spoken answer: nothing to train the "
                            f"talker on")


class TalkerCounter:
    """The loop's counter for the talker run: thinker conversations from the loader, talker positions and frames
    from the forward step."""

    def __init__(self, iterator, step: TalkerRunStep):
        from .data import TokenCounter

        self.inner, self.step = TokenCounter(iterator), step

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.inner)

    def take(self, held=()) -> dict:
        thinker, talker = self.inner.take(held), self.step.take()
        return dict(thinker, thinker_tokens=thinker["tokens"], tokens=talker["positions"],
                    padded=talker["positions"], frames=talker["frames"])


class TalkerFlops:
    """Model FLOPs of a talker step: the talker decoder's active parameters per position and the code predictor's
    per frame (G positions each), forward + backward (x 6 per multiply-accumulate, x 4 for a frozen part that still
    passes gradients, x 2 forward only), plus the frozen thinker's first accept_hidden_layer layers per thinker
    token (forward). Attention scores, the towers and norms are not counted (short sequences; a lower bound)."""

    def __init__(self, settings: TalkerSettings):
        from ..configs import code_predictor_config_of, talker_config_of, talker_text_config_of, text_config_of
        from ..model.language_model import count_parameters

        cfg = settings.hf_config
        text = talker_text_config_of(cfg)
        shared = 3 * text["hidden_size"] * int(text.get("shared_expert_intermediate_size") or 0)
        self.decoder = count_parameters(text, include_embeddings=False)["active"] + shared * text["num_hidden_layers"]
        self.predictor = count_parameters(code_predictor_config_of(cfg), include_embeddings=False)["active"]
        talker = talker_config_of(cfg)
        self.groups = int(talker["num_code_groups"])
        thinker = text_config_of(cfg)
        layers = int(talker["accept_hidden_layer"])
        self.thinker = count_parameters(thinker, include_embeddings=False)["active"] * layers // max(
            thinker["num_hidden_layers"], 1)
        t = settings.talker
        self.decoder_factor = 4 if t.freeze_decoder else 6
        self.predictor_factor = 2 if t.freeze_predictor else 6

    def __call__(self, seen: dict) -> dict:
        return {"talker": self.decoder_factor * self.decoder * seen["tokens"]
                + self.predictor_factor * self.predictor * seen["frames"] * self.groups,
                "thinker": 2 * self.thinker * seen["thinker_tokens"]}


def talker_stage(settings: TalkerSettings):
    from .data import train_loader, val_loader
    from .loop import Stage

    step = TalkerRunStep(settings)
    return Stage(
        name="finetune_talker", build=lambda s, load: build_talker_run(s, step, load), forward_step=step,
        train_loader=lambda s, state: train_loader(s, state, encoder=spoken_task_encoder(s)),
        val_loader=lambda s: val_loader(s, encoder=spoken_task_encoder(s)),
        counter=lambda iterator: TalkerCounter(iterator, step), flops=TalkerFlops, check_data=check_spoken_shards)


def train_talker(settings: TalkerSettings) -> None:
    from .loop import train

    settings.validate()
    train(settings, stage=talker_stage(settings))


def main(argv=None) -> None:
    from .loop import settings_main

    settings_main("python -m omni_model.train.talker_run", TalkerSettings, train_talker, argv)


if __name__ == "__main__":
    main()
