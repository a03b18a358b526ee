"""Report items (PNG plots, small HTML tables) from the stages' contract outputs, for `snakemake --report`.

Each function reads files a stage wrote and writes one item; none needs Snakemake. Plots use matplotlib's Agg
backend (no display needed).
"""

from __future__ import annotations

import csv
import html
import json
import tarfile
from pathlib import Path
from typing import Iterable, Sequence

STYLE = ("<style>body{font-family:sans-serif;font-size:13px} table{border-collapse:collapse} "
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left} th{background:#eee} "
         "td.n{text-align:right}</style>")


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (no display on the machines that make the report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def html_table(title: str, columns: Sequence[str], rows: Iterable[Sequence], note: str = "") -> str:
    def cell(value) -> str:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return f"<td class='n'>{html.escape(text)}</td>" if numeric else f"<td>{html.escape(text)}</td>"

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "\n".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    note_html = f"<p>{html.escape(note)}</p>" if note else ""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{STYLE}</head>"
            f"<body><h3>{html.escape(title)}</h3>{note_html}<table><tr>{head}</tr>\n{body}</table></body></html>\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ data
STAGE_ORDER = ("validate", "datajuicer", "shards")  # where a sample can be dropped, in pipeline order


def data_summary(shards_report: dict, png: Path, table: Path) -> None:
    """Kept / dropped by stage and op: a horizontal bar chart and a table."""
    order = {stage: i for i, stage in enumerate(STAGE_ORDER)}
    by_op = sorted(shards_report["dropped_by_stage_op"].items(), key=lambda kv: (order.get(kv[0].split("/")[0], 9), kv[0]))
    plt = pyplot()
    labels = ["kept (train)", "kept (val)"] + [f"dropped: {key}" for key, _ in by_op]
    values = [shards_report["train"], shards_report["val"]] + [n for _, n in by_op]
    colors = ["#2a7", "#5b9"] + ["#d55"] * len(by_op)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.2))
    ax.barh(labels[::-1], values[::-1], color=colors[::-1])
    for y, value in enumerate(values[::-1]):
        ax.text(value, y, f" {value}", va="center")
    ax.set_xlabel("samples")
    ax.set_title(f"{shards_report['input']} input = {shards_report['kept']} kept + {shards_report['dropped']} dropped")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    rows = [(key.split("/")[0], key.split("/", 1)[1], n) for key, n in by_op]
    rows += [("total", "input", shards_report["input"]), ("total", "kept (train)", shards_report["train"]),
             ("total", "kept (val)", shards_report["val"]), ("total", "dropped", shards_report["dropped"])]
    Path(table).write_text(html_table("Samples by stage and op", ["stage", "op", "samples"], rows))


def drops_table(drops_jsonl: Path, out: Path) -> int:
    drops = read_jsonl(drops_jsonl)
    rows = [(d.get("id", ""), d.get("stage", ""), d.get("op", ""), d.get("reason", "")) for d in drops]
    Path(out).write_text(html_table(f"Dropped samples ({len(rows)})", ["id", "stage", "op", "reason"], rows))
    return len(rows)


def shard_token_counts(shards_dir: Path) -> dict[str, list[int]]:
    """num_tokens of every sample in the train / val tars (read from the samples' json members only)."""
    counts: dict[str, list[int]] = {"train": [], "val": []}
    for tar_path in sorted(Path(shards_dir).glob("*.tar")):
        split = tar_path.name.split("-")[0]
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    counts.setdefault(split, []).append(json.load(tar.extractfile(member))["num_tokens"])
    return counts


def token_histogram(counts: dict[str, list[int]], png: Path, max_seq_len: int | None = None) -> None:
    """Histogram of tokens per sample, train and val on the same bins; max_seq_len drawn when it is in range."""
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    everything = [n for values in counts.values() for n in values]
    bins = np.linspace(min(everything), max(everything) + 1, 31) if everything else 10
    for split, values in counts.items():
        if values:
            ax.hist(values, bins=bins, alpha=0.6, label=f"{split} ({len(values)} samples)")
    title = "token lengths"
    if everything:
        title += f": min {min(everything)}, median {int(np.median(everything))}, max {max(everything)}"
    if max_seq_len and everything and max_seq_len <= 1.2 * max(everything):
        ax.axvline(max_seq_len, color="k", linestyle="--", label=f"data.max_seq_len {max_seq_len}")
    elif max_seq_len:
        title += f" (data.max_seq_len {max_seq_len})"
    ax.set_xlabel("tokens per sample (after media expansion)")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ benchmarks
def benchmarks_table(bench_dir: Path, stages: Sequence[str], out: Path) -> int:
    """One row per rule: its last benchmark (Snakemake's benchmark tsv: s, max_rss, cpu_time, ...)."""
    rows = []
    for stage in stages:
        path = Path(bench_dir) / f"{stage}.tsv"
        if not path.is_file():
            continue
        with open(path) as handle:
            records = list(csv.DictReader(handle, delimiter="\t"))
        if records:
            last = records[-1]
            rows.append((stage, float(last.get("s", "nan")), last.get("h:m:s", ""),
                         _number(last.get("max_rss")), _number(last.get("cpu_time"))))
    Path(out).write_text(html_table("Rule benchmarks", ["rule", "seconds", "h:m:s", "max RSS (MB)", "CPU time (s)"],
                                    rows, note="From benchmarks/<rule>.tsv (Snakemake's benchmark directive)."))
    return len(rows)


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text or "-"


# ------------------------------------------------------------------------------------------------ convert
def _flatten(value, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [row for key, item in value.items() for row in _flatten(item, f"{prefix}{key}.")]
    if isinstance(value, list) and len(value) > 8:
        return [(prefix.rstrip("."), f"[{len(value)} items]")]
    return [(prefix.rstrip("."), json.dumps(value) if isinstance(value, (list, type(None))) else value)]


def parity_table(parity_json: Path, convert_json: Path, out: Path) -> None:
    parity = json.loads(Path(parity_json).read_text())
    convert = json.loads(Path(convert_json).read_text())
    rows = [("parity", key, value) for key, value in _flatten(parity)]
    rows += [("convert", key, value) for key, value in _flatten(convert) if not key.startswith("hf_files")]
    Path(out).write_text(html_table("Conversion parity (converted mcore checkpoint vs transformers)",
                                    ["file", "key", "value"], rows))


# ------------------------------------------------------------------------------------------------ training
CURVES = (("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"), ("tokens_per_s", "tokens/s"))


def train_curves(metrics_jsonl: Path, png: Path) -> int:
    """Loss (+ eval loss), lr, grad-norm, tokens/s against the step; returns the number of training records."""
    records = read_jsonl(metrics_jsonl)
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6))
    train = [r for r in records if "step" in r and r.get("loss") is not None]  # a step record may carry eval_loss too
    evals = [r for r in records if "step" in r and r.get("eval_loss") is not None]
    for ax, (key, title) in zip(axes.flat, CURVES):
        points = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker=".", label="train")
        if key == "loss":
            eval_points = [(r["step"], r["eval_loss"]) for r in evals]
            if eval_points:
                ax.plot(*zip(*eval_points), marker="o", label="eval")
            ax.legend()
        ax.set_title(title if points else f"{title} (not recorded)")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return len(train)
