"""`snakemake --cores 2 export` on the default config, as a user runs it, from the converted workflow that the DAG
tests share: with `train.iters: 0` results/export/hf gives back results/model/hf bit for bit; after a short training
run with frozen towers (and a short finetune_talker run on the demo's spoken answers) the export carries the trained
LLM and talker, while the towers and code2wav come back bit-identical, and MANIFEST.json says what was trained.

Then `snakemake evaluate` on that trained workflow (only evaluate_model of base and tuned and the report items run,
not finetune or export again): base and tuned evaluations with per-modality scores and generated answers, the
report's Evaluation section as a browser shows it; a changed training setting reruns the tuned evaluation only, never
the base one.

The tests share one clone and run in file order: the `train.iters: 0` test first, on the untrained clone; the
module fixture `trained` (the frozen-towers run) is first requested after it, and the evaluation tests build on it."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from test_export import hf_tensor_differences
from test_finetune_workflow import _jobs_run, planned_jobs
from test_first_hour import report_view
from workflow_utils import clone_workflow, snakemake

NO_TRAINING = ("train={iters: 0}", "train_talker={iters: 0}")
TRAIN_FROZEN = ("iters: 3, lr_warmup_iters: 1, eval_interval: 0, save_interval: 0, freeze_vision: true, "
                "freeze_audio: true")
# enough to change the weights (the demo covers 20); the evaluation runs with the same config, so nothing reruns
FROZEN_TOWERS = (f"train={{{TRAIN_FROZEN}}}", "train_talker={iters: 2, lr_warmup_iters: 1}")


@pytest.fixture(scope="module")
def wf(converted_workflow, tmp_path_factory):
    return clone_workflow(converted_workflow, tmp_path_factory.mktemp("export_dag") / "wf")


def _run(wf, config: tuple):
    result = snakemake(wf, "--cores", "2", "export", "--config", *config, timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


@pytest.fixture(scope="module")
def trained(wf):
    """The clone after the short training with frozen towers and its export: first requested by the second test,
    after the `train.iters: 0` one has checked the untrained export."""
    _run(wf, FROZEN_TOWERS)
    return wf


@pytest.fixture(scope="module")
def evaluated(trained):
    """`snakemake evaluate report_evaluate` on the trained clone, with its training config: only the evaluations and
    their report items run."""
    result = snakemake(trained, "--cores", "2", "evaluate", "report_evaluate", "--config", *FROZEN_TOWERS,
                       timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    ran = _jobs_run(result)
    print(f"evaluate ran: {sorted(ran)}")
    assert not ran & {"finetune", "finetune_talker", "export", "convert", "datajuicer", "shards"}, sorted(ran)
    assert "evaluate_model" in ran and "report_evaluate" in ran
    return trained, result


@pytest.mark.slow
def test_dag_export_without_training_gives_back_the_source_bit_for_bit(wf):
    from omni_model.download import verify_manifest

    # this test checks the untrained clone: it runs before `trained` (file order), never after
    assert not (wf / "results/train_talker/latest").exists(), "the clone was trained already"
    _run(wf, NO_TRAINING)
    assert (wf / "results/train/latest").read_text().strip() == "../model/mcore/checkpoint"
    source, export = wf / "results/model/hf", wf / "results/export/hf"
    count, problems = hf_tensor_differences(source, export)
    print(f"DAG export (train.iters 0): {count} tensors, differences: {problems}")
    assert count > 500 and not problems
    assert verify_manifest(export) == []
    index = json.loads((export / "model.safetensors.index.json").read_text())
    assert any(name.startswith("talker.") for name in index["weight_map"])
    assert any(name.startswith("code2wav.") for name in index["weight_map"])
    assert "talker/code2wav tensors copied unchanged" in (wf / "logs/export.log").read_text()
    assert "its speech was NOT re-aligned to the tuned thinker" in (wf / "logs/finetune_talker.log").read_text()
    assert not (wf / "results/train_talker/latest").exists()

    again = snakemake(wf, "-n", "export", "--config", *NO_TRAINING)
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_dag_export_after_training_with_frozen_towers(trained):
    """Reuses the DAG above: only finetune (3 steps, vision + audio frozen), finetune_talker and export run again."""
    wf = trained
    assert (wf / "results/train/latest").read_text().strip() == "iter_0000003"
    count, problems = hf_tensor_differences(wf / "results/model/hf", wf / "results/export/hf")
    changed = sorted(p.split(":")[0] for p in problems)
    print(f"DAG export after 3 steps with frozen towers: {len(changed)} of {count} tensors changed, e.g. "
          f"{changed[:3]}")
    assert all(p.endswith(": values differ") for p in problems)  # same names, dtypes and shapes
    assert changed and all(name.startswith(("thinker.model.", "thinker.lm_head.", "talker.")) for name in changed)
    assert "thinker.lm_head.weight" in changed
    assert "talker.codec_head.weight" in changed and "talker.code_predictor.lm_head.0.weight" in changed
    assert (wf / "results/train_talker/latest").read_text().strip() == "iter_0000002"
    manifest = json.loads((wf / "results/export/hf/MANIFEST.json").read_text())["source"]
    assert manifest["trained"] == {"thinker": {"llm": True, "vision": False, "audio": False},
                                   "talker": {"decoder": True, "predictor": True, "projections": True},
                                   "code2wav": False}


@pytest.mark.slow
def test_base_and_tuned_are_evaluated_per_modality_with_answers(evaluated):
    wf, result = evaluated
    summaries = {name: json.loads((wf / f"results/eval/{name}.json").read_text()) for name in ("base", "tuned")}
    for name, summary in summaries.items():
        scores = summary["scores"]
        print(f"{name}: {json.dumps(scores['all'])} modalities {sorted(scores['by_modality'])} "
              f"text exact {summary['text']['exact_match']} chrf {summary['text']['chrf']:.1f}")
        val = json.loads((wf / "results/data/shards/report.json").read_text())["val"]
        assert scores["all"]["samples"] == val and scores["all"]["tokens"] > 0
        assert sum(group["samples"] for group in scores["by_modality"].values()) == val
        assert set(scores["by_modality"]) <= {"text", "image", "audio", "video", "mixed"}
        assert len(scores["by_modality"]) >= 3  # the demo set mixes every kind
        assert summary["text"]["samples"] == 4 and summary["speech"] is None
    # the tuned weights differ from the base ones: the val loss moves
    assert summaries["tuned"]["scores"]["all"]["loss"] != summaries["base"]["scores"]["all"]["loss"]
    rows = [json.loads(line) for line in (wf / "results/eval/tuned_samples.jsonl").read_text().splitlines()]
    answered = [row for row in rows if "answer" in row]
    assert len(answered) == 4 and all(row["reference"] and row["prompt"] for row in answered)
    assert "[evaluate] tuned:" in result.stdout + result.stderr  # the rule's closing line on the console
    table = (wf / "results/report/eval_table.html").read_text()
    assert "base vs tuned" in table and "modality" in table and "exact_match" in table
    samples = (wf / "results/report/eval_samples.html").read_text()
    assert all(row["id"] in samples for row in answered)
    assert (wf / "results/report/eval_modality.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_training_change_reruns_the_tuned_evaluation_only(evaluated):
    wf, _ = evaluated
    outputs = ["results/eval/base.json", "results/eval/tuned.json"]
    unchanged = snakemake(wf, "-n", *outputs, "--config", *FROZEN_TOWERS)
    assert unchanged.returncode == 0 and "Nothing to be done" in unchanged.stdout + unchanged.stderr
    changed = snakemake(wf, "-n", *outputs, "--config", f"train={{{TRAIN_FROZEN}, lr: 2.0e-3}}", FROZEN_TOWERS[1])
    assert changed.returncode == 0, changed.stderr[-3000:]
    output = changed.stdout + changed.stderr
    print(f"planned after train.lr changed: {planned_jobs(output)}")
    assert planned_jobs(output) == {"finetune": 1, "finetune_talker": 1, "export": 1, "evaluate_model": 1}
    assert "output: results/eval/tuned.json" in output and "output: results/eval/base.json" not in output


def _close(shown: str, value: float) -> bool:
    """A table cell (reporting.html_table prints floats with 4 significant digits) against the summary's number."""
    return shown != "" and abs(float(shown) - value) <= 5e-4 * abs(value) + 1e-12


def _words(text) -> str:
    return " ".join(str(text).split())  # the browser's innerText collapses runs of white space


@pytest.mark.slow
def test_report_shows_the_evaluation_section_with_the_numbers_of_the_summaries(evaluated, tmp_path):
    """`snakemake --report` after `snakemake evaluate`, opened in headless Chromium: the before vs after table shows
    the numbers of results/eval/{base,tuned}.json (read here on their own), the per-modality plot loads, the sample
    table has one row per generated answer with its prompt, reference and both answers; a report made while the
    items are older than the summaries is refused."""
    wf, _ = evaluated
    result = snakemake(wf, "--report", "report.html", "evaluate")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    seen = report_view(wf / "report.html", ["Evaluation"], tmp_path)
    print({key: {k: v for k, v in item.items() if k != "tables"} for key, item in seen.items()})
    base, tuned = (json.loads((wf / f"results/eval/{name}.json").read_text()) for name in ("base", "tuned"))

    # before vs after: the rendered rows, keyed by (group, metric) -> (base, tuned, change)
    [table] = seen["Evaluation/base vs tuned"]["tables"]
    assert table[0] == ["group", "metric", "base", "tuned", "change"]
    rows = {(group, metric): rest for group, metric, *rest in table[1:]}
    expected = [("all samples", "loss", base["scores"]["all"], tuned["scores"]["all"])]
    expected += [(f"modality {mix}", "loss", scores, tuned["scores"]["by_modality"][mix])
                 for mix, scores in base["scores"]["by_modality"].items()]
    assert len(expected) >= 4  # all samples + the demo's modality mixes
    for group, _, b, t in expected:
        for metric in ("loss", "accuracy"):
            shown_base, shown_tuned, change = rows[(group, f"{metric} (answer tokens)")]
            assert _close(shown_base, b[metric]) and _close(shown_tuned, t[metric]), (group, metric)
        change = rows[(group, "loss (answer tokens)")][2]  # "+0.1 (worse)": tuned - base, lower loss is better
        verdict = "better" if t["loss"] < b["loss"] else "worse" if t["loss"] > b["loss"] else "same"
        assert change.endswith(f"({verdict})") and _close(change.split()[0], t["loss"] - b["loss"]), (group, change)
    answers = f"generated ({base['text']['samples']} answers)"
    for metric in ("exact_match", "wer", "cer", "bleu", "chrf"):
        shown_base, shown_tuned, _ = rows[(answers, metric)]
        assert _close(shown_base, base["text"][metric]) and _close(shown_tuned, tuned["text"][metric]), metric

    # the per-modality plot: the PNG loads, at the size of the file on disk
    with Image.open(wf / "results/report/eval_modality.png") as image:
        assert seen["Evaluation/per modality"]["png_width"] == image.width > 0

    # the sample table: one row per generated answer, in the summaries' sample files
    generated = {name: [row for row in map(json.loads, (wf / f"results/eval/{name}_samples.jsonl").read_text()
                                           .splitlines()) if "answer" in row] for name in ("base", "tuned")}
    [samples] = seen["Evaluation/answers"]["tables"]
    assert samples[0] == ["dataset", "id", "source", "prompt", "reference", "base answer", "tuned answer"]
    assert len(samples) - 1 == len(generated["base"]) == base["text"]["samples"] == 4
    tuned_answers = {row["id"]: row["answer"] for row in generated["tuned"]}
    for shown, row in zip(samples[1:], generated["base"]):
        assert shown == [_words(v) for v in ("val", row["id"], row["source"] or "", row["prompt"], row["reference"],
                                             row["answer"], tuned_answers[row["id"]])]
    # spoken answers: none without a trained talker, and no players
    assert base["speech"] is None and tuned["speech"] is None
    assert not any(item["audio"] for item in seen.values())

    # items older than the summaries they show (an evaluation that ran again since) are refused, not shown stale
    summary = wf / "results/eval/tuned.json"
    text, stat = summary.read_text(), summary.stat()
    summary.write_text(text + "\n")
    try:
        stale = snakemake(wf, "--report", "stale.html", "evaluate")
    finally:
        summary.write_text(text)
        os.utime(summary, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    console = stale.stdout + stale.stderr
    assert stale.returncode != 0 and not (wf / "stale.html").exists(), console[-2000:]
    assert "The report items of report_evaluate are missing or older than what they report on" in console
    assert "Run `snakemake --cores all --force report_evaluate`" in console
