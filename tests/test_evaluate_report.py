"""The evaluation's metrics and report items without a model: error rates counted by hand, the headline metric that
eval.metric picks per source, the before vs after table's directions, the sample table's escaping."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from omni_model.eval import metrics, report


def test_scores_against_hand_counted_references():
    refs = ["the cat sat on the mat", "hello world"]
    hyps = ["the cat sit on the mat", "hello  world "]  # one substituted word of 8; whitespace does not count
    scores = metrics.corpus_scores(refs, hyps)
    assert scores["exact_match"] == 0.5
    assert scores["wer"] == pytest.approx(1 / 8)
    assert scores["cer"] == pytest.approx(1 / (len("the cat sat on the mat") + len("hello world")))
    assert metrics.corpus_scores(refs, refs)["chrf"] == pytest.approx(100.0)


def test_headline_metric_per_source():
    assert metrics.headline_metric("librispeech_asr", ["a long transcript of speech"], "auto") == "wer"
    assert metrics.headline_metric("vqa", ["red"], "auto") == "exact_match"
    assert metrics.headline_metric("chat", ["a sentence of several words"], "auto") == "chrf"
    assert metrics.headline_metric("chat", ["x"], {"chat": "bleu", "default": "cer"}) == "bleu"
    assert metrics.headline_metric("other", ["x"], {"chat": "bleu", "default": "cer"}) == "cer"
    with pytest.raises(ValueError, match="eval.metric 'rouge' is not one of"):
        metrics.headline_metric("chat", ["x"], "rouge")


def summary(loss: float, accuracy: float, answers: list[str]) -> dict:
    rows = [{"reference": "red", "answer": a, "source": "vqa"} for a in answers]
    group = {"samples": 2, "tokens": 10, "loss": loss, "accuracy": accuracy}
    return {"split": "val", "scores": {"all": group, "by_modality": {"image": group, "text": group},
                                       "by_source": {"vqa": group}},
            "text": metrics.text_summary(rows, "auto"), "speech": None}


def test_report_items(tmp_path):
    base, tuned = tmp_path / "base.json", tmp_path / "tuned.json"
    base.write_text(json.dumps(summary(3.0, 0.2, ["blue", "green"])))
    tuned.write_text(json.dumps(summary(1.0, 0.9, ["red", "red"])))
    rows = report.comparison_rows(json.loads(base.read_text()), json.loads(tuned.read_text()))
    by_name = {(group, metric): change for group, metric, _, _, change in rows}
    assert by_name[("all samples", "loss (answer tokens)")] == "-2 (better)"
    assert by_name[("modality image", "accuracy (answer tokens)")].endswith("(better)")
    assert by_name[("generated, source vqa", "exact_match (headline)")] == "+1 (better)"
    assert by_name[("generated (2 answers)", "wer")] == "-1 (better)"
    assert report.comparison_table(base, tuned, tmp_path / "t.html") == len(rows)
    assert report.modality_plot(base, tuned, tmp_path / "m.png") == ["image", "text"]
    with Image.open(tmp_path / "m.png") as image:
        assert image.size == (1000, 400)
    samples = [{"id": "s1", "source": "vqa", "prompt": "<image>What colour?", "reference": "red", "answer": "blue"}]
    (tmp_path / "b.jsonl").write_text(json.dumps(samples[0]) + "\n")
    (tmp_path / "t.jsonl").write_text(json.dumps({**samples[0], "answer": "red"}) + "\n")
    assert report.sample_table(tmp_path / "b.jsonl", tmp_path / "t.jsonl", tmp_path / "s.html") == 1
    html = (tmp_path / "s.html").read_text()
    assert "&lt;image&gt;What colour?" in html and "<td>blue</td><td>red</td>" in html and "<td>val</td>" in html


def test_eval_data_rows_follow_the_val_rows():
    overlap = {"overlap_with_training": {"samples": 1, "ids": ["s1"]}}
    base = dict(summary(3.0, 0.2, ["blue", "red"]), eval_data=dict(summary(2.0, 0.5, ["blue", "blue"]), **overlap))
    tuned = dict(summary(1.0, 0.9, ["red", "red"]), eval_data=dict(summary(2.5, 0.4, ["red", "blue"]), **overlap))
    rows = report.comparison_rows(base, tuned)
    extra = [row for row in rows if row[0].startswith("eval.data (1 in training) ")]
    assert len(extra) == len(rows) // 2 and rows[-len(extra):] == extra
    by_name = {(group, metric): change for group, metric, _, _, change in extra}
    assert by_name[("eval.data (1 in training) all samples", "loss (answer tokens)")] == "+0.5 (worse)"
    assert by_name[("eval.data (1 in training) generated (2 answers)", "exact_match")] == "+0.5 (better)"


def test_scoring_runs_on_one_node_of_the_configured_ranks(tmp_path):
    from omni_model.eval.run import Evaluation, scoring_settings

    ev = Evaluation(name="tuned", checkpoint="c", mcore_dir=str(tmp_path), hf_dir="h", shards="s", processed="p",
                    parallel={"tp": 2}, launch={"gpus_per_node": 8, "cpu_procs": 2})
    settings = scoring_settings(ev, tmp_path)
    assert (settings.world_size, settings.layout.dp, settings.train.global_batch_size) == (8, 4, 4)
    with pytest.raises(ValueError, match="evaluate runs on one node of 8 ranks"):
        scoring_settings(Evaluation(**{**vars(ev), "parallel": {"tp": 16}}), tmp_path)
