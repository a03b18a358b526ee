"""finetune_talker (issue 22 items 3, 5, 6): the talker trained on spoken answers, fed by the thinker, exported.

The proof that it learns what users need: the tiny model's talker, trained by our run (train.talker_run on
train.loop, one gloo rank) on two spoken answers whose inputs our thinker built (train.talker_inputs), is exported
(convert.export, the talker rows of the Mapper); transformers' `Qwen3OmniMoeForConditionalGeneration.generate(...,
return_audio=True)` on the EXPORTED folder, greedy (talker_do_sample False, its default repetition penalty kept),
then produces exactly the trained code sequence for a trained prompt, and its waveform equals code2wav of those codes
bit for bit; the source talker does not. The thinker is the converted one (not tuned here), so its text is held to the
trained answer with generate's own `thinker_prefix_allowed_tokens_fn`: the talker's input is then built by transformers
from the thinker's states of exactly that answer, and the codes are what the talker makes of it. The codes the talker
generated are read where generate hands them to code2wav (the real `chunked_decode`, called through).
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

ANSWERS = [("Say hello to the harbor.", "Hello harbor.", 0.4, 330.0), ("Name a comet.", "Halley.", 0.3, 520.0)]
ITERS = 60
TALKER = {"iters": ITERS, "lr": 5e-3, "min_lr": 5e-3, "lr_decay_style": "constant", "lr_warmup_iters": 0,
          "global_batch_size": 2, "save_interval": ITERS // 2, "keep_checkpoints": None}
IM_END = 151645


def _tone(seconds: float, f0: float) -> np.ndarray:
    t = np.arange(int(seconds * 24000)) / 24000
    return (0.3 * np.sin(2 * np.pi * (f0 + 120 * t) * t)).astype(np.float32)


def _records(root: Path) -> Path:
    media = root / "media"
    media.mkdir(parents=True)
    lines = []
    for k, (question, answer, seconds, f0) in enumerate(ANSWERS):
        sf.write(media / f"a{k}.wav", _tone(seconds, f0), 24000, subtype="PCM_16")
        lines.append({"id": f"spoken-{k}", "messages": [{"role": "user", "content": question}, {
            "role": "assistant", "content": answer, "audio": f"media/a{k}.wav"}]})
    lines.append({"id": "text-only", "messages": [{"role": "user", "content": "Describe a lantern."},
                                                  {"role": "assistant", "content": "It glows."}]})
    (root / "raw.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "raw.jsonl"


@pytest.fixture(scope="module")
def single_rank_env():
    """This module's in-process runs as rank 0 of 1 (env://, a free port), restored afterwards: left in the test
    worker's environment, RANK and MASTER_PORT made every later Snakemake job of that worker take the torchrun path
    on one fixed port (EADDRINUSE in other tests' converts under make test)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    values = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _settings(root: Path, run: str, talker: dict):
    from omni_model.train.talker_run import TalkerSettings, talker_train_section

    settings = TalkerSettings(
        hf_dir=str(root / "mcore"), init_checkpoint=str(root / "mcore" / "checkpoint"),
        shards=str(root / "data" / "shards"), train_dir=str(root / run),
        train=talker_train_section({"eval_interval": 0}, talker), talker=talker, data={"max_seq_len": 1024},
        talker_init=str(root / "hf"))
    settings.dump(root / run / "settings.json")  # as the rule's script does (the export's MANIFEST reads it)
    return settings


def _train(settings) -> None:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from omni_model.runtime.parallel import destroy_parallel
    from omni_model.train.talker_run import train_talker

    # what a backward outside a schedule earlier in this pytest worker leaves behind (an MoE test's parity check):
    # the run must not depend on which tests the worker ran before (CI failed on exactly this)
    MoEAuxLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0)
    try:
        train_talker(settings)
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def prepared(tiny_hf_dir, tmp_path_factory, single_rank_env):
    """Shards of two spoken answers (+ one text-only sample) made by the tiny codec, the converted thinker."""
    from omni_model.convert import convert_checkpoint
    from omni_model.data.formats import load_raw
    from omni_model.data.shards import write_shards
    from omni_model.runtime.parallel import destroy_parallel, init_parallel
    from omni_model.tiny import write_tiny_codec

    root = tmp_path_factory.mktemp("talker_finetune")
    shutil.copytree(tiny_hf_dir, root / "hf")
    records, drops, _ = load_raw(_records(root))
    assert drops == []
    (root / "data").mkdir()
    (root / "data" / "processed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_shards(root / "data" / "processed.jsonl", root / "data" / "shards", root / "hf", val_fraction=0.0,
                 max_seq_len=1024, codec_dir=write_tiny_codec(root / "codec", seed=0))
    init_parallel()
    try:
        convert_checkpoint(root / "hf", root / "mcore", dtype="fp32", log=lambda line: None)
    finally:
        destroy_parallel()
    return root


@pytest.fixture(scope="module")
def trained(prepared):
    """ITERS talker steps on the two spoken answers, then the export with the tuned talker."""
    from omni_model.convert.export import export_to_hf
    from omni_model.runtime.parallel import destroy_parallel
    from omni_model.train.checkpointing import read_latest

    _train(_settings(prepared, "train_talker", TALKER))
    try:
        export_to_hf(prepared / "mcore" / "checkpoint", prepared / "hf", prepared / "export",
                     talker_checkpoint=read_latest(prepared / "train_talker"), log=lambda line: None)
    finally:
        destroy_parallel()
    return prepared


def _trained_codes(shards: Path) -> dict:
    out = {}
    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if ".speech" in member.name:
                    import io

                    out[member.name.split(".")[0]] = torch.from_numpy(
                        np.load(io.BytesIO(tar.extractfile(member).read())).astype(np.int64))
    return out


def _speak(model_dir: Path, question: str, answer: str):
    """(codes [G, T] generate gave code2wav, waveform, the model) of a greedy spoken answer to `question`, the
    thinker's text held to `answer`."""
    from transformers import AutoTokenizer, Qwen3OmniMoeForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    inputs = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                       return_tensors="pt")
    forced = tokenizer(answer, add_special_tokens=False)["input_ids"] + [IM_END]
    start = inputs["input_ids"].shape[1]

    def allowed(_, ids):
        step = ids.shape[0] - start
        return [forced[step] if step < len(forced) else IM_END]

    seen = []
    decode = model.code2wav.chunked_decode

    def chunked_decode(codes, *args, **kwargs):  # the real decoder, called through; the codes recorded
        seen.append(codes.clone())
        return decode(codes, *args, **kwargs)

    model.code2wav.chunked_decode = chunked_decode
    with torch.no_grad():
        ids, wave = model.generate(**inputs, return_audio=True, thinker_max_new_tokens=len(forced),
                                   thinker_do_sample=False, thinker_prefix_allowed_tokens_fn=allowed,
                                   talker_do_sample=False, talker_max_new_tokens=40)
    assert tokenizer.decode(ids[0, start:]) == answer + "<|im_end|>"
    return seen[0][0], wave, model


def test_trained_talker_regenerates_its_spoken_answers(trained):
    codes = _trained_codes(trained / "data" / "shards")
    assert set(codes) == {"spoken-0", "spoken-1"}
    for k, (question, answer, _, _) in enumerate(ANSWERS):
        expected = codes[f"spoken-{k}"]
        got, wave, model = _speak(trained / "export", question, answer)
        print(f"spoken-{k}: {expected.shape[1]} frames trained, {got.shape[1]} generated")
        assert torch.equal(got, expected)
        with torch.no_grad():
            reference = model.code2wav.chunked_decode(expected[None], chunk_size=300, left_context_size=25).float()
        assert torch.equal(wave, reference)


def test_source_talker_does_not(trained):
    codes = _trained_codes(trained / "data" / "shards")
    for k, (question, answer, _, _) in enumerate(ANSWERS):
        got, _, _ = _speak(trained / "hf", question, answer)
        expected = codes[f"spoken-{k}"]
        assert got.shape != expected.shape or not torch.equal(got, expected)


def test_export_writes_the_tuned_talker_and_says_what_was_trained(trained):
    from safetensors import safe_open

    from omni_model.convert.export import source_tensors

    manifest = json.loads((trained / "export" / "MANIFEST.json").read_text())
    assert manifest["source"]["trained"] == {"thinker": {"llm": False, "vision": False, "audio": False},
                                   "talker": {"decoder": True, "predictor": True, "projections": True},
                                   "code2wav": False}
    source, exported = source_tensors(trained / "hf"), source_tensors(trained / "export")
    assert set(source) == set(exported)

    def read(entry):
        with safe_open(str(entry.file), "pt") as f:
            return f.get_tensor(entry.name)

    changed = {name for name in source if not torch.equal(read(source[name]), read(exported[name]))}
    assert changed and all(name.startswith("talker.") for name in changed)  # thinker and code2wav bit-exact
    talker = [n for n in source if n.startswith("talker.")]
    # every trained talker tensor moved (the source's unused speaker/control rows of the codec embedding too little
    # to matter: compare whole tensors)
    assert len(changed) >= 0.9 * len(talker), (len(changed), len(talker))


def test_talker_run_resumes_exactly(trained):
    """The trained run killed after its mid-run checkpoint (the last checkpoint and `latest` gone, in a copy of its
    folder) continues with the same losses and ends with the same weights as the run that was not interrupted."""
    from omni_model.train.checkpointing import iter_dir, read_latest
    from omni_model.train.metrics import read_metrics

    whole_dir, train_dir = trained / "train_talker", trained / "resume"
    shutil.copytree(whole_dir, train_dir)
    shutil.rmtree(iter_dir(train_dir, ITERS))
    (train_dir / "latest").unlink()
    _train(_settings(trained, "resume", TALKER))
    whole, resumed = ([r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r]
                      for d in (whole_dir, train_dir))
    print(f"losses uninterrupted {whole[-3:]}, resumed {resumed[-3:]}")
    assert len(whole) == ITERS and resumed == whole
    resumed_weights, whole_weights = (_model_tensors(read_latest(d), trained / "hf") for d in (train_dir, whole_dir))
    assert resumed_weights.keys() == whole_weights.keys()
    assert all(torch.equal(resumed_weights[k], whole_weights[k]) for k in whole_weights)


def _model_tensors(checkpoint: Path, hf_dir: Path) -> dict:
    """The talker tensors of a talker checkpoint (HF names, as the export reads them)."""
    from omni_model.convert.export import export_talker_tensors
    from omni_model.runtime.parallel import destroy_parallel, init_parallel

    init_parallel()
    try:
        return dict(export_talker_tensors(checkpoint, json.loads((hf_dir / "config.json").read_text())))
    finally:
        destroy_parallel()


def test_no_talker_training_reasons(prepared, tmp_path):
    from omni_model.train.talker_run import not_trained_reason

    assert not_trained_reason(_settings(prepared, "r1", dict(TALKER, iters=0)), {}) == "train_talker.iters is 0"
    assert "LoRA" in not_trained_reason(_settings(prepared, "r2", TALKER), {"lora": {"enabled": True}})
    assert not_trained_reason(_settings(prepared, "r3", TALKER), {}) == ""


def test_a_thinker_layout_with_cp_or_pp_plans_and_passes_the_talker_through():
    """parallel.cp / pp > 1 is for the thinker (long rows, deep pipelines): the plan is not refused for the talker,
    whose run says instead why it trained nothing (it has no pp / cp path yet)."""
    from omni_model.train.talker_run import check_talker_plan, layout_reason

    for key, word in (("cp", "context"), ("pp", "pipeline")):
        config = {"train": {}, "train_talker": dict(TALKER), "parallel": {key: 2}}
        check_talker_plan(config)  # no SettingsError
        assert layout_reason(config["parallel"]) == f"parallel.{key} = 2: the talker trains without {word} parallelism yet"
    assert layout_reason({"tp": 2, "ep": 2}) == ""


def test_evaluate_speaks_with_the_exported_talker(trained, tmp_path):
    """evaluate's spoken answers (omni_model.eval.generate.generate_speech) on the export: a wav per spoken sample,
    as long as the row says, within the frame cap; the talker trained on these answers ends its speech itself."""
    from omni_model.eval.generate import SPEECH_FRAMES_CAP, generate_speech

    rows = generate_speech(trained / "export", trained / "data" / "shards", "train", 5, 8, tmp_path / "speech",
                           encoder_settings={"max_seq_len": 1024})
    assert sorted(row["id"] for row in rows) == ["spoken-0", "spoken-1"]  # the text-only sample is not spoken
    codes = _trained_codes(trained / "data" / "shards")
    for row in rows:
        wave, rate = sf.read(row["wav"])
        assert rate == 24000 and len(wave) == round(row["seconds"] * 24000) > 0
        assert row["reference_frames"] == codes[row["id"]].shape[1]
        assert row["frames"] <= SPEECH_FRAMES_CAP[0] * row["reference_frames"] + SPEECH_FRAMES_CAP[1]
        print(f"{row['id']}: answer {row['answer']!r}, {row['frames']} frames (reference {row['reference_frames']}), "
              f"ended {row['ended']}")
