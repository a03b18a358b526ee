"""`snakemake evaluate` on the demo data (a clone of the converted workflow, a short training): base and tuned
evaluations with per-modality scores and generated answers, the report's Evaluation items; a changed training
setting reruns the tuned evaluation only, never the base one."""

from __future__ import annotations

import json

import pytest

from test_finetune_workflow import planned_jobs
from workflow_utils import clone_workflow, snakemake

SHORT_TRAINING = "train={iters: 3}"  # enough to change the weights; the demo budget covers the default 20


@pytest.fixture(scope="module")
def evaluated(converted_workflow, tmp_path_factory):
    wf = clone_workflow(converted_workflow, tmp_path_factory.mktemp("evaluate_dag") / "wf")
    result = snakemake(wf, "--cores", "2", "evaluate", "report_evaluate", "--config", SHORT_TRAINING, timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return wf, result


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
    unchanged = snakemake(wf, "-n", *outputs, "--config", SHORT_TRAINING)
    assert unchanged.returncode == 0 and "Nothing to be done" in unchanged.stdout + unchanged.stderr
    changed = snakemake(wf, "-n", *outputs, "--config", "train={iters: 3, lr: 2.0e-3}")
    assert changed.returncode == 0, changed.stderr[-3000:]
    output = changed.stdout + changed.stderr
    print(f"planned after train.lr changed: {planned_jobs(output)}")
    assert planned_jobs(output) == {"finetune": 1, "export": 1, "evaluate_model": 1}
    assert "output: results/eval/tuned.json" in output and "output: results/eval/base.json" not in output
