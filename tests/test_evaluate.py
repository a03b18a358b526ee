"""`evaluate` can tell a model that learned from one that did not: the tiny model trained (the real training under
torchrun) on a few short answers until it memorises them scores exact match 1.0, WER 0 and next-token accuracy 1.0 on
them, the untrained base does not; a model with another tokenizer than the data's is refused with a clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ANSWERS = ["alpha", "bravo", "charlie", "delta"]
ITERS, LR = 60, 1.0e-2  # the fastest found: 2 one-word answers memorised (loss ~1e-4) in ~50 s on one CPU rank


def write_records(path: Path) -> Path:
    records = [{"id": f"m{i}", "source": "code_words",
                "messages": [{"role": "user", "content": f"Code word {i}?"}, {"role": "assistant", "content": word}]}
               for i, word in enumerate(ANSWERS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def memorised(tiny_hf_dir, tmp_path_factory):
    """Converted tiny model, shards of the records (half train, half val), a training run on the train half, its
    export: (root, evaluation arguments shared by base and tuned)."""
    from omni_model.convert import convert_checkpoint
    from omni_model.convert.export import export_to_hf
    from omni_model.data.shards import write_shards
    from omni_model.runtime.launch import run_torchrun
    from omni_model.runtime.parallel import destroy_parallel, init_parallel
    from omni_model.train.checkpointing import read_latest
    from omni_model.train.settings import TrainSettings

    root = tmp_path_factory.mktemp("evaluate")
    init_parallel()
    try:
        convert_checkpoint(tiny_hf_dir, root / "mcore", dtype="fp32", log=lambda _: None)
    finally:
        destroy_parallel()
    processed = write_records(root / "processed.jsonl")
    write_shards(processed, root / "shards", root / "mcore", val_fraction=0.5)
    settings = TrainSettings(
        hf_dir=str(root / "mcore"), init_checkpoint=str(root / "mcore/checkpoint"), shards=str(root / "shards"),
        train_dir=str(root / "train"), data={"max_seq_len": 4096},
        train={"iters": ITERS, "lr": LR, "min_lr": LR, "lr_decay_style": "constant", "lr_warmup_iters": 0,
               "global_batch_size": 1, "cpu_procs": 1, "eval_interval": 0, "save_interval": 0, "seq_len": 256})
    settings.dump(root / "train_settings.json")
    run_torchrun("omni_model.train", ["--settings", str(root / "train_settings.json")], nproc_per_node=1)
    tuned = read_latest(root / "train")
    try:
        export_to_hf(tuned, tiny_hf_dir, root / "export", log=lambda _: None)
    finally:
        destroy_parallel()
    common = dict(mcore_dir=str(root / "mcore"), shards=str(root / "shards"), processed=str(processed),
                  split="train", launch={"cpu_procs": 1}, data={"max_seq_len": 4096}, generate_samples=4,
                  max_new_tokens=6)
    return root, common, {"base": (root / "mcore/checkpoint", tiny_hf_dir), "tuned": (tuned, root / "export")}


def evaluate(root: Path, common: dict, name: str, checkpoint: Path, hf_dir: Path) -> tuple[dict, list]:
    from omni_model.eval.run import Evaluation, evaluate_model

    ev = Evaluation(name=name, checkpoint=str(checkpoint), hf_dir=str(hf_dir), **common)
    summary = evaluate_model(ev, root / f"{name}.json", root / f"{name}.jsonl")
    rows = [json.loads(line) for line in (root / f"{name}.jsonl").read_text().splitlines()]
    return summary, rows


@pytest.mark.slow
def test_tuned_model_reproduces_what_it_memorised_and_the_base_does_not(memorised):
    root, common, models = memorised
    base, base_rows = evaluate(root, common, "base", *models["base"])
    tuned, tuned_rows = evaluate(root, common, "tuned", *models["tuned"])
    for name, summary in (("base", base), ("tuned", tuned)):
        print(f"{name}: loss {summary['scores']['all']['loss']:.4f} accuracy {summary['scores']['all']['accuracy']:.3f}"
              f" exact {summary['text']['exact_match']} wer {summary['text']['wer']:.3f}")
    trained_ids = {row["id"] for row in tuned_rows}
    assert len(trained_ids) == 2 and trained_ids == {row["id"] for row in base_rows}
    # generated answers, scored by jiwer / sacrebleu against the references
    assert tuned["text"]["samples"] == 2 and tuned["text"]["exact_match"] == 1.0 and tuned["text"]["wer"] == 0.0
    assert [row["answer"] for row in tuned_rows] == [row["reference"] for row in tuned_rows]
    assert {row["reference"] for row in tuned_rows} <= set(ANSWERS)
    assert base["text"]["exact_match"] < 1.0 and base["text"]["wer"] > 0.0
    # the mcore forward: every answer token predicted, loss near zero after training; far from it before
    assert tuned["scores"]["all"]["accuracy"] == 1.0 and tuned["scores"]["all"]["loss"] < 0.05
    assert base["scores"]["all"]["accuracy"] < 0.5 and base["scores"]["all"]["loss"] > 5.0
    # grouping: the user's `source` field and the modality mix come back per sample
    assert set(tuned["scores"]["by_source"]) == {"code_words"} and set(tuned["scores"]["by_modality"]) == {"text"}
    assert tuned["text"]["by_source"]["code_words"]["metric"] == "exact_match"  # auto: one-word answers
    assert tuned["speech"] is None


@pytest.mark.slow
def test_a_model_with_another_tokenizer_is_refused(memorised, tmp_path):
    from omni_model.eval.generate import TokenizerMismatch

    root, common, models = memorised
    other = tmp_path / "hf_other_template"
    shutil.copytree(models["base"][1], other)
    template = other / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    with pytest.raises(TokenizerMismatch, match=r"evaluation refused: the tokenizer of .*hf_other_template.* is not "
                                                r"the one .*shards was encoded with"):
        evaluate(root, common, "mismatch", models["base"][0], other)
    assert not (root / "mismatch.json").exists() and not (root / "mismatch.jsonl").exists()


@pytest.mark.slow
def test_eval_data_is_encoded_like_training_data_and_its_overlap_counted(memorised, tmp_path):
    """eval.data = the four records (two of them in the training split) + one invalid line: the invalid line is a
    counted drop, the overlap names the two trained ids, and the tuned model reproduces exactly those two."""
    from omni_model.eval.data import prepare_eval_data
    from omni_model.eval.generate import split_samples
    from omni_model.eval.run import Evaluation, evaluate_model

    root, common, models = memorised
    raw = tmp_path / "extra.jsonl"
    raw.write_text(write_records(tmp_path / "records.jsonl").read_text() + '{"id": "empty", "messages": []}\n')
    report = prepare_eval_data(raw, tmp_path / "eval_data", models["base"][1], Path(common["processed"]),
                               Path(common["shards"]))
    trained = {sample["record"]["id"] for sample in split_samples(Path(common["shards"]), "train", 10)}
    print(f"eval_data report: {report}")
    assert (report["input"], report["kept"], report["dropped"]) == (5, 4, 1)
    assert report["overlap_with_training"] == {"samples": 2, "ids": sorted(trained)}
    ev = Evaluation(name="tuned", checkpoint=str(models["tuned"][0]), hf_dir=str(models["tuned"][1]), **common)
    summary = evaluate_model(ev, tmp_path / "tuned.json", tmp_path / "tuned.jsonl", eval_data=tmp_path / "eval_data")
    extra = summary["eval_data"]
    assert extra["scores"]["all"]["samples"] == 4 and extra["text"]["samples"] == 4
    assert extra["overlap_with_training"]["samples"] == 2
    rows = [json.loads(line) for line in (tmp_path / "tuned.jsonl").read_text().splitlines()]
    answered = {row["id"]: row for row in rows if row["dataset"] == "eval_data"}
    assert all(answered[sid]["answer"] == answered[sid]["reference"] for sid in trained)
    assert all(answered[sid]["answer"] != answered[sid]["reference"] for sid in set(answered) - trained)


def test_answers_and_scores_read_the_same_samples_of_a_split_of_several_tars(tiny_hf_dir, tmp_path):
    """split.yaml names a split's tars as a brace pattern (train-{000000..000002}.tar): the generated answers
    (split_samples) read every sample Energon's loader gives the scoring ranks (the rows are joined by id), in the
    order the shards stage wrote them."""
    from megatron.energon import WorkerConfig

    from omni_model.data.shards import write_shards
    from omni_model.data.task_encoder import OmniTaskEncoder, build_loader
    from omni_model.eval.generate import split_samples

    records = [{"id": f"s{i}", "messages": [{"role": "user", "content": f"Question {i}?"},
                                            {"role": "assistant", "content": f"Answer {i}."}]} for i in range(5)]
    processed = tmp_path / "processed.jsonl"
    processed.write_text("".join(json.dumps(r) + "\n" for r in records))
    write_shards(processed, tmp_path / "shards", tiny_hf_dir, val_fraction=0.0, max_samples=2)
    assert len(list((tmp_path / "shards").glob("train-*.tar"))) == 3
    loader = build_loader(tmp_path / "shards", OmniTaskEncoder(tiny_hf_dir), split="train", batch_size=1,
                          packing_buffer_size=None, worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
                          repeat=False)
    energon_ids = [batch.sample_ids[0][0] for batch in loader]
    answered_ids = [sample["record"]["id"] for sample in split_samples(tmp_path / "shards", "train", 10)]
    assert sorted(energon_ids) == [r["id"] for r in records]
    assert answered_ids == [r["id"] for r in records]
    assert [s["record"]["id"] for s in split_samples(tmp_path / "shards", "train", 3)] == ["s0", "s1", "s2"]


def test_the_answer_model_runs_transformers_own_layers_not_hub_kernels(tiny_hf_dir):
    """transformers >= 5.25 replaces layers by kernels fetched from the Hub unless told not to: on the offline H100 of
    the full-depth run that made from_pretrained fail; evaluate's answers come from the modules that were trained."""
    from omni_model.eval.generate import load_model

    assert load_model(tiny_hf_dir).use_kernels is False
