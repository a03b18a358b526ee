"""A set shaped like real fine-tuning data, which the demo set is not: templated prompts that differ only in a number,
the same prompt over many different images / audios ("Describe the image.", "Transcribe the audio."), LLaMA-Factory
(``conversations``) and ms-swift (``messages``) rows, 44.1 / 22.05 / 48 kHz and stereo audio, multi-audio rows, and
7 bad rows. Every good row must reach the shards; every bad row must be reported with its reason (re-encoded
copies as duplicates naming the original).

Before media-aware dedup (text-only document_/minhash deduplicators, digits stripped) this set kept 5 of the 29 good rows
(24 dropped as `document_deduplicator: duplicate`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dedup_media import clip, picture, reencode_audio, resave_image, tone

RATES = [44100, 22050, 48000]


def _sharegpt(sid, turns, system=None, **media):
    conv = []
    for user, answer in turns:
        conv += [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
    return {"id": sid, "conversations": conv, **({"system": system} if system else {}), **media}


def _swift(sid, turns, system=None, **media):
    messages = [{"role": "system", "content": system}] if system else []
    for user, answer in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"id": sid, "messages": messages, **media}


def write_templated_set(root: Path) -> tuple[Path, list[str], dict]:
    """(jsonl, good ids, {bad id: (stage, op, reason fragment)})."""
    media = root / "media"
    media.mkdir(parents=True)
    rows, good, bad = [], [], {}
    for k in range(6):  # LLaMA-Factory VQA: identical text over different images
        name = picture(media / f"vqa{k}.{'png' if k % 2 else 'jpg'}", k).name
        rows.append(_sharegpt(f"lf-vqa-{k}", [("<image>Describe the image.", "A picture.")],
                              images=[f"media/{name}"]))
    for k in range(6):  # LLaMA-Factory ASR: prompt differs only in a number; 44.1/22.05/48 kHz, stereo every other
        name = tone(media / f"asr{k}.wav", k, rate=RATES[k % 3], channels=1 + k % 2).name
        rows.append(_sharegpt(f"lf-asr-{k}", [(f"<audio>Transcribe clip {k + 1}.", f"Clip {k + 1}: a tone.")],
                              audios=[f"media/{name}"]))
    for k in range(6):  # ms-swift text rows differing only in digits
        rows.append(_swift(f"ms-sum-{k}", [(f"What is {k + 10} plus {k + 20}?", f"It is {2 * k + 30}.")]))
    for k in range(4):  # ms-swift multi-audio, same template
        names = [tone(media / f"pair{k}-{j}.flac", 10 + 2 * k + j, rate=RATES[(k + j) % 3], fmt="FLAC").name
                 for j in range(2)]
        rows.append(_swift(f"ms-pair-{k}", [("First <audio>, then <audio>. Which is higher?", "The second.")],
                           audios=[f"media/{n}" for n in names]))
    for k in range(3):  # ms-swift image + audio, identical text
        image = picture(media / f"mix{k}.png", 20 + k).name
        audio = tone(media / f"mix{k}.wav", 20 + k, rate=RATES[k], channels=2).name
        rows.append(_swift(f"ms-mix-{k}", [("<image><audio>Do they match?", "Yes.")], images=[f"media/{image}"],
                           audios=[f"media/{audio}"]))
    for k in range(2):  # video, identical text
        name = clip(media / f"clip{k}.mp4", k + 1).name
        rows.append(_swift(f"ms-video-{k}", [("<video>What moves?", "A block.")], videos=[f"media/{name}"]))
    for k in range(2):  # multi-turn with a system prompt
        name = picture(media / f"turn{k}.png", 30 + k).name
        rows.append(_swift(f"ms-turns-{k}", [("Hello.", "Hi, how can I help?"), ("<image>Count the shapes.", "Two.")],
                           system="You are a careful assistant.", images=[f"media/{name}"]))
    good = [row["id"] for row in rows]

    resave_image(media / "vqa0.jpg", media / "vqa0-copy.jpg", quality=70)
    rows.append(_sharegpt("bad-vqa-copy", [("<image>Describe the image.", "A picture.")],
                          images=["media/vqa0-copy.jpg"]))
    bad["bad-vqa-copy"] = ("datajuicer", "omni_document_media_deduplicator", "duplicate of lf-vqa-0")
    reencode_audio(media / "asr2.wav", media / "asr2-copy.flac")
    rows.append(_sharegpt("bad-asr-copy", [("<audio>Transcribe clip 3.", "Clip 3: a tone.")],
                          audios=["media/asr2-copy.flac"]))
    bad["bad-asr-copy"] = ("datajuicer", "omni_document_media_deduplicator", "duplicate of lf-asr-2")
    rows.append(_sharegpt("bad-missing", [("<image>Describe the image.", "A picture.")], images=["media/gone.png"]))
    bad["bad-missing"] = ("validate", "media", "missing image file: media/gone.png")
    (media / "broken.wav").write_bytes(b"RIFF0000WAVEjunk" + bytes(range(64)))
    rows.append(_sharegpt("bad-audio-header", [("<audio>Transcribe clip 9.", "Clip 9.")],
                          audios=["media/broken.wav"]))
    bad["bad-audio-header"] = ("validate", "decode", "audio0.wav (broken.wav): cannot decode audio")
    rows.append(_swift("bad-roles", [("Only a question.", "An answer.")]))
    rows[-1]["messages"] = rows[-1]["messages"][::-1]
    bad["bad-roles"] = ("validate", "structure", "wrong role order")
    rows.append(_swift("bad-tags", [("<audio><audio>Two tags.", "One file.")], audios=["media/asr0.wav"]))
    bad["bad-tags"] = ("validate", "structure", "2 <audio> tag(s) but 1 audios")
    rows.append(_sharegpt("bad-empty", [("<image>Describe the image.", "  ")], images=["media/vqa1.png"]))
    bad["bad-empty"] = ("validate", "structure", "empty assistant turn")

    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, good, bad


FORKS: list = []
os.register_at_fork(before=lambda: FORKS.append(1))  # counts this process's forks (a test reads the difference)


@pytest.fixture(scope="module")
def templated(tiny_hf_dir, tmp_path_factory):
    from omni_model.data.datajuicer import run_stage
    from omni_model.data.shards import write_shards

    root = tmp_path_factory.mktemp("templated")
    raw, good, bad = write_templated_set(root)
    forks_before = len(FORKS)
    dj = run_stage(raw, Path("config/datajuicer_recipe.yaml"), root / "processed.jsonl", root / "drops.jsonl",
                   num_proc=1)
    forks = len(FORKS) - forks_before
    report = write_shards(root / "processed.jsonl", root / "shards", tiny_hf_dir, previous_drops=root / "drops.jsonl",
                          input_count=dj["input"], max_samples=16, val_fraction=0.2, seed=0, max_seq_len=4096)
    drops = {d["id"]: d for d in map(json.loads, (root / "shards" / "drops.jsonl").read_text().splitlines())}
    return {"good": good, "bad": bad, "dj": dj, "report": report, "drops": drops, "root": root, "forks": forks}


def test_every_good_row_is_kept(templated):
    report = templated["report"]
    print(f"templated set: input {report['input']}, kept {report['kept']}, dropped {report['dropped']} "
          f"{report['dropped_by_stage_op']}")
    assert len(templated["good"]) == 29 and len(templated["bad"]) == 7
    assert report["input"] == 36 and report["kept"] == 29 and report["dropped"] == 7
    assert not set(templated["good"]) & set(templated["drops"]), \
        {sid: templated["drops"][sid]["reason"] for sid in set(templated["good"]) & set(templated["drops"])}


def test_every_bad_row_is_reported_with_its_reason(templated):
    assert set(templated["drops"]) == set(templated["bad"])
    for sid, (stage, op, fragment) in templated["bad"].items():
        drop = templated["drops"][sid]
        assert (drop["stage"], drop["op"]) == (stage, op), drop
        assert fragment in drop["reason"], drop


def test_one_process_runs_data_juicer_in_this_process(templated):
    """np 1 forks nothing: datasets runs num_proc=1 in a forked pool of one, and a fork of a process holding torch's
    threads segfaulted there (a whole test module lost)."""
    assert templated["forks"] == 0
