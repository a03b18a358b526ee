"""Report items from stage outputs (omni_model.reporting), without Snakemake: plots are real PNGs of the expected
size, tables hold every row, training curves read metrics.jsonl as the finetune stage writes it."""

from __future__ import annotations

import json

from PIL import Image

from omni_model import reporting


def _png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_data_summary_and_drop_list(tmp_path):
    report = {"input": 10, "kept": 6, "dropped": 4, "train": 5, "val": 1,
              "dropped_by_stage_op": {"shards/max_seq_len": 1, "validate/parse": 2, "datajuicer/text_length_filter": 1}}
    reporting.data_summary(report, tmp_path / "s.png", tmp_path / "s.html")
    assert _png_size(tmp_path / "s.png")[0] == 800
    table = (tmp_path / "s.html").read_text()
    # pipeline order: validate, datajuicer, shards; then the totals
    assert table.index("parse") < table.index("text_length_filter") < table.index("max_seq_len") < table.index("input")
    drops = tmp_path / "drops.jsonl"
    drops.write_text("".join(json.dumps({"id": f"s{i}", "stage": "validate", "op": "parse", "reason": f"<bad {i}>"}) + "\n"
                             for i in range(4)))
    assert reporting.drops_table(drops, tmp_path / "d.html") == 4
    assert "&lt;bad 3&gt;" in (tmp_path / "d.html").read_text()  # reasons are escaped, not HTML


def test_train_curves_and_benchmarks(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 5.0 / s, "lr": 1e-4 * s, "grad_norm": 1.0, "tokens_per_s": 100.0 + s} for s in range(1, 6)]
    rows[3]["eval_loss"] = 1.5  # the finetune stage writes eval_loss into the step's record
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert reporting.train_curves(metrics, tmp_path / "c.png") == 5
    assert _png_size(tmp_path / "c.png") == (1000, 600)
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "shards.tsv").write_text("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                                      "12.5\t0:00:12\t812.3\t1\t1\t1\t0\t0\t50\t11.0\n")
    assert reporting.benchmarks_table(bench, ["download", "shards"], tmp_path / "b.html") == 1
    assert "812.3" in (tmp_path / "b.html").read_text()


def test_parity_table_flattens_both_records(tmp_path):
    (tmp_path / "parity.json").write_text(json.dumps({"pass": True, "max_abs": 7.7e-7, "tolerance": {"abs": 1e-4}}))
    (tmp_path / "convert.json").write_text(json.dumps({"dtype": "fp32", "hf_files": ["a", "b"]}))
    reporting.parity_table(tmp_path / "parity.json", tmp_path / "convert.json", tmp_path / "p.html")
    text = (tmp_path / "p.html").read_text()
    assert "max_abs" in text and "7.7e-07" in text and "tolerance.abs" in text and "hf_files" not in text
