"""Long media through the real DAG (`snakemake` CLI on a clone of the shared converted workflow), context parallel:
a generated 20-minute audio and 5-minute video conversation beside short text ones.

* Default recipe: both are dropped at the datajuicer stage, each with the measured duration and the bounds it is
  outside of (audio <= 30 s, video <= 60 s): never a silent truncation.
* Raised duration limits, parallel.cp 2, train.seq_len = data.max_seq_len = 3072: the 5-minute video is kept whole
  (its frames spread over all 300 s, data.video_max_frames) and trains at cp2 on CPU; the 20-minute audio (15,636
  tokens) is dropped at the shards stage naming max_seq_len 3072.
* (OMNI_LONG_AUDIO_TRAIN=1) max_seq_len = seq_len = 16384: the 20-minute audio is kept too and trains at cp2, its
  LM loss over chunks of train.loss_chunk_tokens = 512 logit rows (model.chunked_loss; whole, the fp32 logits of its
  152k-token vocabulary would take ~14 GB per cp2 rank). Measured on the 2-core CI box: 3.45-3.65 GiB per rank, the
  finetune job 8.3 GB max RSS (PSS 7.9 GB) and 9 minutes: more than a shared test box gives one test (~6 GB), so it
  runs only when asked. The CP split and the chunked loss are exact at any length (tests/test_context_parallel.py,
  tests/test_chunked_loss.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from workflow_utils import clone_workflow, snakemake

AUDIO_SECONDS, VIDEO_SECONDS = 1200.0, 300.0
AUDIO_TOKENS = 15636  # the 20-minute audio conversation after media expansion (~13 audio tokens a second)
LONG_SEQ_LEN = 16384
# a packed row without the audio: at most train.packing_buffer_size (16) samples of <= 400 tokens (texts ~100, the
# video's 64 frames x 4 tokens)
ROW_WITHOUT_AUDIO_MAX = 16 * 400


def _long_media_jsonl(out: Path) -> Path:
    from omni_model.data.demo import _Gen

    gen = _Gen(out, seed=11)
    gen.media.mkdir(parents=True, exist_ok=True)
    audio, audio_text = gen.audio("long-audio", AUDIO_SECONDS, 16000)
    video, video_text = gen.video("long-video", VIDEO_SECONDS, fps=1)

    def record(sid, user, answer, **media):
        return {"id": sid, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                **{key: [f"media/{name}"] for key, name in media.items()}}

    records = [record("long-audio", "<audio>Describe the whole recording.", f"I hear {audio_text}.", audios=audio),
               record("long-video", "<video>What happens in this video?", f"It shows {video_text}.", videos=video)]
    records += [record(f"text-{i}", f"Write one line about the {gen.phrase(2)}. {gen.sentence()}",
                       f"Here it is: {gen.sentence()}") for i in range(6)]
    path = out / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _drops(wf: Path) -> dict:
    """Every drop of the data stages: Data-Juicer's report and the shards stage's."""
    files = [wf / "results/data/drops.jsonl", wf / "results/data/shards/drops.jsonl"]
    lines = [line for path in files if path.exists() for line in path.read_text().splitlines()]
    return {d["id"]: d for d in map(json.loads, lines)}


@pytest.fixture(scope="module")
def long_media(converted_workflow, tmp_path_factory):
    wf = clone_workflow(converted_workflow, tmp_path_factory.mktemp("long_media") / "wf")
    return wf, _long_media_jsonl(wf / "long_data")


@pytest.mark.slow
def test_long_media_are_dropped_by_the_default_limits_with_reason(long_media):
    wf, raw = long_media
    result = snakemake(wf, "--cores", "2", "datajuicer", "--config", f"data={{raw: {raw}}}", timeout=1200)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    drops = _drops(wf)
    print({sid: d["reason"] for sid, d in drops.items()})
    assert "audio_duration=[1.2e+03] outside bounds (max_duration=30" in drops["long-audio"]["reason"]
    assert "video_duration=[300] outside bounds (max_duration=60" in drops["long-video"]["reason"]
    assert drops["long-audio"]["stage"] == drops["long-video"]["stage"] == "datajuicer"  # beside the demo's bad ones


def _finetune_at_cp2(long_media, seq_len: int, train_extra: str = "") -> Path:
    """Two cp2 finetune steps on the long media at `seq_len`, with the recipe's duration limits (30 s audio, 60 s
    video) raised past the long clips so that only max_seq_len decides what trains. Returns the workflow."""
    wf, raw = long_media
    recipe = (wf / "config/datajuicer_recipe.yaml").read_text()
    assert "max_duration: 30\n" in recipe and "max_duration: 60\n" in recipe
    raised = wf / "long_data/recipe.yaml"
    raised.write_text(recipe.replace("max_duration: 30\n", "max_duration: 1500\n")
                      .replace("max_duration: 60\n", "max_duration: 400\n"))
    data = (f"data={{raw: {raw}, recipe: {raised}, max_seq_len: {seq_len}, val_fraction: 0.0, video_fps: 1.0, "
            f"video_max_frames: 64, video_min_pixels: 1024, video_max_pixels: 4096}}")
    train = (f"train={{iters: 2, lr_warmup_iters: 1, seq_len: {seq_len}, global_batch_size: 2, eval_interval: 0, "
             f"save_interval: 0{train_extra}}}")
    result = snakemake(wf, "--cores", "2", "finetune", "--config", data, train, "parallel={cp: 2}", timeout=2400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return wf


@pytest.mark.slow
def test_long_video_trains_at_cp2_and_the_long_audio_is_dropped_naming_the_limit(long_media):
    wf = _finetune_at_cp2(long_media, 3072)
    drops = _drops(wf)
    print({sid: (d["stage"], d["reason"]) for sid, d in drops.items()})
    assert set(drops) == {"long-audio"} and drops["long-audio"]["stage"] == "shards"
    assert "15636 tokens after media expansion > max_seq_len 3072" in drops["long-audio"]["reason"]
    kept = [json.loads(line)["id"] for line in (wf / "results/data/processed.jsonl").read_text().splitlines()]
    assert "long-video" in kept
    records = [json.loads(line) for line in (wf / "results/train/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    print(f"cp2 long-media finetune: losses {losses}")
    assert len(losses) == 2 and all(loss == loss and loss > 0 for loss in losses)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("OMNI_LONG_AUDIO_TRAIN") != "1",
                    reason="OMNI_LONG_AUDIO_TRAIN=1: trains a 15,636-token row at cp2 (~8 GB for the job, 9 min on "
                           "2 cores)")
def test_long_audio_and_video_train_at_cp2_with_a_chunked_loss(long_media):
    wf = _finetune_at_cp2(long_media, LONG_SEQ_LEN, ", loss_chunk_tokens: 512")
    drops = _drops(wf)
    print({sid: (d["stage"], d["reason"]) for sid, d in drops.items()})
    assert not {"long-audio", "long-video"} & set(drops)
    kept = [json.loads(line)["id"] for line in (wf / "results/data/processed.jsonl").read_text().splitlines()]
    assert {"long-audio", "long-video"} <= set(kept)
    records = [json.loads(line) for line in (wf / "results/train/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    print(f"cp2 long-media finetune: losses {[r['loss'] for r in steps]}, tokens {[r['tokens'] for r in steps]}, "
          f"peak memory {[r['mem_gib'] for r in steps]} GiB")
    assert len(steps) == 2 and all(r["loss"] == r["loss"] and r["loss"] > 0 for r in steps)
    # each step's 2 rows (<= 16384 tokens each) hold more than 16384 + a row without the audio: both hold the audio
    assert all(r["tokens"] > LONG_SEQ_LEN + ROW_WITHOUT_AUDIO_MAX for r in steps)
    bench = (wf / "benchmarks/finetune.tsv").read_text().splitlines()
    print("finetune job (snakemake benchmark, all its processes):",
          dict(zip(bench[0].split("\t"), bench[-1].split("\t"))))
