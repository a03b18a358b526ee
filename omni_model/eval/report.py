"""The report's "Evaluation" items from results/eval/{base,tuned}.json and their per-sample jsonl: the before vs after
table, a per-modality bar plot (loss and next-token accuracy), the sample table (prompt, reference, base answer,
tuned answer). A spoken-answers item (audio players) goes beside these once a talker is trained."""

from __future__ import annotations

import json
from pathlib import Path

from ..reporting import html_table, pyplot, read_jsonl
from .metrics import LOWER_IS_BETTER, METRICS


def _change(metric: str, base, tuned) -> str:
    if base is None or tuned is None:
        return ""
    better = tuned < base if metric in LOWER_IS_BETTER else tuned > base
    return f"{tuned - base:+.4g} ({'better' if better else 'worse' if tuned != base else 'same'})"


def _loss_rows(label: str, base: dict, tuned: dict) -> list[tuple]:
    return [(label, f"{metric} (answer tokens)", base.get(metric), tuned.get(metric),
             _change(metric, base.get(metric), tuned.get(metric))) for metric in ("loss", "accuracy")]


def comparison_rows(base: dict, tuned: dict) -> list[tuple]:
    """(group, metric, base, tuned, change) for the val split, then for eval.data when it was evaluated."""
    rows = dataset_rows(base, tuned)
    if "eval_data" in base and "eval_data" in tuned:
        overlap = base["eval_data"]["overlap_with_training"]["samples"]
        rows += [(f"eval.data ({overlap} in training) {group}", *rest)
                 for group, *rest in dataset_rows(base["eval_data"], tuned["eval_data"])]
    return rows


def dataset_rows(base: dict, tuned: dict) -> list[tuple]:
    """The losses (all, per modality, per source) and the generated-answer metrics (all, and each source's headline
    metric) of one evaluated set."""
    rows = _loss_rows("all samples", base["scores"]["all"], tuned["scores"]["all"])
    for key, scope in (("by_modality", "modality"), ("by_source", "source")):
        for group, scores in base["scores"][key].items():
            rows += _loss_rows(f"{scope} {group}", scores, tuned["scores"][key].get(group, {}))
    for metric in METRICS:
        b, t = base["text"].get(metric), tuned["text"].get(metric)
        rows.append((f"generated ({base['text']['samples']} answers)", metric, b, t, _change(metric, b, t)))
    for source, scores in base["text"].get("by_source", {}).items():
        metric = scores["metric"]
        t = tuned["text"].get("by_source", {}).get(source, {}).get(metric)
        rows.append((f"generated, source {source}", f"{metric} (headline)", scores["value"], t,
                     _change(metric, scores["value"], t)))
    return rows


def comparison_table(base_json: Path, tuned_json: Path, out: Path) -> int:
    base, tuned = json.loads(Path(base_json).read_text()), json.loads(Path(tuned_json).read_text())
    rows = [tuple("" if v is None else v for v in row) for row in comparison_rows(base, tuned)]
    note = (f"Split {base['split']}. Loss and next-token accuracy by the Megatron-Core thinker on every sample's "
            f"answer tokens; generated answers greedy (transformers), exact match / WER / CER (jiwer) / BLEU / chrF "
            f"(sacrebleu, 0-100). Spoken answers are not evaluated (no talker is trained).")
    Path(out).write_text(html_table("Evaluation: base vs tuned", ["group", "metric", "base", "tuned", "change"],
                                    rows, note))
    return len(rows)


def modality_plot(base_json: Path, tuned_json: Path, png: Path) -> list[str]:
    """Grouped bars per modality mix: loss (left) and next-token accuracy (right), base vs tuned."""
    base, tuned = json.loads(Path(base_json).read_text()), json.loads(Path(tuned_json).read_text())
    mixes = sorted(set(base["scores"]["by_modality"]) | set(tuned["scores"]["by_modality"]))
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    width = 0.4
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for offset, (name, summary) in zip((-width / 2, width / 2), (("base", base), ("tuned", tuned))):
            values = [(summary["scores"]["by_modality"].get(mix) or {}).get(metric) or 0.0 for mix in mixes]
            ax.bar([i + offset for i in range(len(mixes))], values, width, label=name)
        ax.set_xticks(range(len(mixes)), mixes)
        ax.set_title(f"{metric} on the answer tokens")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return mixes


def sample_table(base_samples: Path, tuned_samples: Path, out: Path) -> int:
    """The generated samples side by side: dataset, id, source, prompt, reference, base answer, tuned answer."""
    def key(row):  # an eval.data sample may share its id with a val one
        return row.get("dataset", "val"), row["id"]

    tuned = {key(row): row for row in read_jsonl(tuned_samples)}
    rows = [(*key(row), row.get("source") or "", row["prompt"], row["reference"], row["answer"],
             tuned.get(key(row), {}).get("answer", ""))
            for row in read_jsonl(base_samples) if "answer" in row]
    Path(out).write_text(html_table("Evaluation: generated answers", ["dataset", "id", "source", "prompt", "reference",
                                                                      "base answer", "tuned answer"], rows))
    return len(rows)
