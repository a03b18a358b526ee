"""One evaluation (base or tuned): scores under torchrun, greedy answers, joined per sample and summarised.

    summary = evaluate_model(Evaluation(name="tuned", checkpoint=..., mcore_dir=..., hf_dir=..., shards=...,
                                        processed=..., ...), out_json, out_samples)

Writes `out_samples` (jsonl, one line per sample: id, modality, source, loss, tokens, accuracy; plus prompt,
reference and answer for the generated ones) and `out_json`:

    {"model", "checkpoint", "hf_dir", "split",
     "scores": {"all": G, "by_modality": {mix: G}, "by_source": {source: G}},   G = samples, tokens, loss, accuracy
     "text": metrics.text_summary of the generated answers,
     "speech": spoken answers of the first eval.speech_samples val samples whose last answer is spoken (talker +
               code2wav through transformers' generate, greedy): {samples, ended (the talker said EOS before the
               cap), seconds, reference_seconds, answers: [{id, prompt, reference, answer, seconds, frames,
               reference_frames, reference_seconds, ended, wav}]}, wavs in results/eval/<model>_speech/;
               null when none is spoken or eval.speech_samples is 0,
     "eval_data": {split, scores, text, overlap_with_training, dropped}  (only with eval.data)}
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

from ..data.sample import MEDIA_LISTS
from ..layout import Layout
from ..train.settings import TrainSettings
from .data import SPLIT as EVAL_DATA_SPLIT
from .generate import check_tokenizer, generate_answers, generate_speech
from .metrics import NO_SOURCE, text_summary

# train.* keys that say where the scoring ranks run (not what they compute)
LAUNCH_KEYS = ("gpus_per_node", "cpu_procs")


@dataclass
class Evaluation:
    name: str  # base | tuned
    checkpoint: str  # torch_dist checkpoint dir
    mcore_dir: str  # config + tokenizer of the mcore model (convert's output dir)
    hf_dir: str  # the HF checkpoint of the same weights (generation)
    shards: str
    processed: str  # the processed jsonl the shards were written from (modality and `source` of each id)
    split: str = "val"
    parallel: dict = field(default_factory=dict)
    launch: dict = field(default_factory=dict)  # LAUNCH_KEYS
    data: dict = field(default_factory=dict)  # encoder settings (as the shards were written with)
    use_te: bool = False
    generate_samples: int = 4
    max_new_tokens: int = 32
    metric: Union[str, dict] = "auto"
    speech_samples: int = 0  # val samples with a spoken last answer answered in speech too
    speaker: str = "ethan"  # talker_config.speaker_id key (train_talker.speaker)


def modality_of(record: dict) -> str:
    """text, image, audio or video; mixed when a conversation has media of two kinds or more."""
    kinds = [kind for kind, key in MEDIA_LISTS.items() if record.get(key)]
    return "text" if not kinds else kinds[0] if len(kinds) == 1 else "mixed"


def sample_meta(processed: Path) -> dict:
    """{id: {modality, source}} of the processed records (the shards keep neither the user's `source` field nor
    the original media lists under their names)."""
    meta = {}
    for line in Path(processed).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            source = record.get("source")
            meta[record["id"]] = {"modality": modality_of(record),
                                  "source": source if isinstance(source, str) else None}
    return meta


def scoring_settings(ev: Evaluation, work_dir: Path) -> TrainSettings:
    """The training settings the scoring ranks run with: the layout on the ranks of ONE node (the job holds one node;
    data parallelism takes what the model-parallel group leaves), one sample per micro-batch."""
    from ..layout import LayoutError

    per_node = ev.launch.get("gpus_per_node") or ev.launch.get("cpu_procs", 1)
    try:
        dp = Layout.of(ev.parallel, per_node).dp
    except LayoutError as error:
        raise ValueError(f"evaluate runs on one node of {per_node} ranks and the layout parallel.* does not fit it: "
                         f"{error}") from None
    train = {**{k: ev.launch[k] for k in LAUNCH_KEYS if k in ev.launch}, "nnodes": 1, "rdzv_endpoint": "",
             "micro_batch_size": 1, "global_batch_size": dp, "packing": False}
    return TrainSettings(hf_dir=ev.mcore_dir, init_checkpoint=ev.checkpoint, shards=ev.shards,
                         train_dir=str(work_dir), train=train, parallel=ev.parallel, data=ev.data, use_te=ev.use_te)


def score(ev: Evaluation, work_dir: Path) -> list[dict]:
    """Per-sample loss/accuracy rows from `python -m omni_model.eval` under torchrun at the configured layout."""
    from ..runtime.launch import run_torchrun

    settings = scoring_settings(ev, work_dir)
    settings.validate()
    settings_path, scores_path = work_dir / f"{ev.name}_settings.json", work_dir / f"{ev.name}_scores.jsonl"
    settings.dump(settings_path)
    run_torchrun("omni_model.eval", ["--settings", str(settings_path), "--checkpoint", ev.checkpoint,
                                     "--split", ev.split, "--out", str(scores_path)],
                 nproc_per_node=settings.world_size)
    return [json.loads(line) for line in scores_path.read_text().splitlines() if line.strip()]


def group_scores(rows: list[dict]) -> dict:
    """samples, answer tokens, token-mean loss and next-token accuracy of a group of scored samples."""
    tokens = sum(r["tokens"] for r in rows)
    return {"samples": len(rows), "tokens": tokens,
            "loss": sum(r["loss_sum"] for r in rows) / tokens if tokens else None,
            "accuracy": sum(r["correct"] for r in rows) / tokens if tokens else None}


def scores_summary(rows: list[dict]) -> dict:
    def grouped(key):
        groups: dict = {}
        for row in rows:
            groups.setdefault(row.get(key) or NO_SOURCE, []).append(row)
        return {name: group_scores(group) for name, group in sorted(groups.items())}

    return {"all": group_scores(rows), "by_modality": grouped("modality"), "by_source": grouped("source")}


def evaluate_set(ev: Evaluation, work_dir: Path, log=print) -> tuple[dict, list]:
    """Scores of every sample of ev.split of ev.shards and greedy answers to the first ev.generate_samples: (summary
    part {split, scores, text}, per-sample rows)."""
    meta = sample_meta(Path(ev.processed))
    rows = [{**meta.get(r["id"], {"modality": None, "source": None}), **r} for r in score(ev, work_dir)]
    log(f"[evaluate] {ev.name}: scored {len(rows)} samples of the {ev.split} split of {ev.shards}")
    generated = generate_answers(Path(ev.hf_dir), Path(ev.shards), ev.split, ev.generate_samples,
                                 ev.max_new_tokens, encoder_settings=ev.data)
    for row in generated:
        row["source"] = meta.get(row["id"], {}).get("source")
    log(f"[evaluate] {ev.name}: {len(generated)} greedy answers from {ev.hf_dir}")
    answers = {row["id"]: row for row in generated}
    samples = []
    for row in rows:
        extra = answers.get(row["id"], {})
        samples.append({"id": row["id"], "modality": row["modality"], "source": row["source"],
                        "loss": row["loss_sum"] / row["tokens"] if row["tokens"] else None, "tokens": row["tokens"],
                        "accuracy": row["correct"] / row["tokens"] if row["tokens"] else None,
                        **{k: extra[k] for k in ("prompt", "reference", "answer", "new_tokens") if k in extra}})
    return {"split": ev.split, "scores": scores_summary(rows), "text": text_summary(generated, ev.metric)}, samples


def speech_summary(ev: Evaluation, out_dir: Path, log=print) -> Optional[dict]:
    """The summary's speech entry (module doc), None without spoken val samples."""
    rows = generate_speech(Path(ev.hf_dir), Path(ev.shards), ev.split, ev.speech_samples, ev.max_new_tokens, out_dir,
                           speaker=ev.speaker, encoder_settings=ev.data)
    if not rows:
        return None
    log(f"[evaluate] {ev.name}: {len(rows)} spoken answers ({sum(r['seconds'] for r in rows):.1f} s, "
        f"{sum(r['ended'] for r in rows)} ended by the talker) in {out_dir}")
    return {"samples": len(rows), "ended": sum(r["ended"] for r in rows),
            "seconds": sum(r["seconds"] for r in rows), "reference_seconds": sum(r["reference_seconds"] for r in rows),
            "answers": rows}


def evaluate_model(ev: Evaluation, out_json: Path, out_samples: Path, eval_data: Optional[Path] = None,
                   log=print) -> dict:
    """Refuse a model with another tokenizer than the data's, evaluate the val split (and `eval_data`: the folder
    omni_model.eval.data.prepare_eval_data wrote), write both outputs. Per-sample rows name their `dataset`."""
    out_json, out_samples = Path(out_json), Path(out_samples)
    for model_dir in (ev.mcore_dir, ev.hf_dir):
        check_tokenizer(Path(model_dir), Path(ev.shards))
    work_dir = out_json.parent / f".{ev.name}_work"
    work_dir.mkdir(parents=True, exist_ok=True)
    part, samples = evaluate_set(ev, work_dir, log)
    summary = {"model": ev.name, "checkpoint": ev.checkpoint, "hf_dir": ev.hf_dir, **part,
               "speech": speech_summary(ev, out_json.parent / f"{ev.name}_speech", log)}
    samples = [dict(row, dataset="val") for row in samples]
    if eval_data is not None:
        eval_data = Path(eval_data)
        extra = replace(ev, shards=str(eval_data / "shards"), processed=str(eval_data / "processed.jsonl"),
                        split=EVAL_DATA_SPLIT)
        check_tokenizer(Path(ev.hf_dir), Path(extra.shards))
        part, extra_samples = evaluate_set(extra, work_dir, log)
        report = json.loads((eval_data / "report.json").read_text())
        summary["eval_data"] = {**part, "overlap_with_training": report["overlap_with_training"],
                                "dropped": report["dropped"]}
        samples += [dict(row, dataset="eval_data") for row in extra_samples]
    out_samples.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    out_json.write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(work_dir, ignore_errors=True)
    return summary
