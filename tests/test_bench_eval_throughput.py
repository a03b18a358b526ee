"""bench/eval_throughput.py's two phases at the tiny size on CPU (the GPU run uses the 30B shapes): both read the same
samples through the stage's own functions, and their counts agree with the encoded samples."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

ANSWER_CAP = 3


def test_scores_and_generate_phases_on_the_tiny_model(tiny_hf_dir, tmp_path):
    from eval_throughput import generate_phase, scores_phase

    from omni_model.data.encoder import OmniEncoder
    from omni_model.data.shards import write_shards
    from omni_model.data.template import IGNORE_INDEX
    from omni_model.eval.generate import last_answer, split_samples

    records = [{"id": f"s{i}", "messages": [{"role": "user", "content": f"Question number {i}?"},
                                            {"role": "assistant", "content": f"Answer {i} " + "word " * i}]}
               for i in range(4)]
    (tmp_path / "processed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_shards(tmp_path / "processed.jsonl", tmp_path / "shards", tiny_hf_dir, val_fraction=0.0, max_samples=2)
    spec = {"device": "cpu", "hf_dir": str(tiny_hf_dir), "shards": str(tmp_path / "shards"), "split": "train",
            "samples": 3, "max_new_tokens": ANSWER_CAP, "max_seq_len": 4096, "warmup": 1, "work": str(tmp_path)}
    scores = scores_phase(spec)
    generated = generate_phase({**spec, "ids": scores["ids"]})
    print({k: v for k, v in scores.items() if k != "ids"}, generated)

    encoder = OmniEncoder(tiny_hf_dir)
    by_id = {s["record"]["id"]: encoder.encode_canonical(s["record"], s["media"])
             for s in split_samples(tmp_path / "shards", "train", 10)}
    chosen = [by_id[sample_id] for sample_id in scores["ids"]]
    assert scores["samples"] == generated["samples"] == len(set(scores["ids"])) == 3
    assert scores["tokens"] == sum(len(e.input_ids) for e in chosen)
    assert scores["answer_tokens"] == sum(int(np.sum(e.labels != IGNORE_INDEX)) for e in chosen)
    assert generated["prompt_tokens"] == sum(last_answer(e.labels)[0] for e in chosen)
    assert 3 <= generated["new_tokens"] <= 3 * ANSWER_CAP
    assert generated["run_s"] > 0 and scores["run_s"] > 0
