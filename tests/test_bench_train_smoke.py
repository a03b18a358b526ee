"""bench/train_throughput.py on the CPU (tiny model, `--smoke`): every code path of the device run but the GPU
kernels: the seeded weights of both models, packed and padded batches, one process per model measuring every kind
twice, the budget plan, the table and the json fields the lead reads (issue 27 item 4). Nothing here is timed: the
figures are checked for their relations (spread, fastest row, ratio), and the first-step losses of ours and
transformers (same weights, same batches, fp32) for equality."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

HF_ROWS = ("sdpa", "padded", "sdpa+fp32")


def test_seeded_weights_are_what_transformers_loads_from_the_same_random_checkpoint(tiny_hf_dir, tmp_path):
    """bench/seeded_weights.fill_hf (drawn in place, experts fused by hand) == transformers' own from_pretrained
    of write_random_checkpoint's files with the same seed (its loader fuses the per-expert tensors)."""
    from seeded_weights import fill_hf
    from transformers import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import \
        Qwen3OmniMoeThinkerForConditionalGeneration as Thinker

    from omni_model.random_checkpoint import write_random_checkpoint

    config = json.loads((tiny_hf_dir / "config.json").read_text())
    write_random_checkpoint(tmp_path / "hf", config, seed=3, log=lambda line: None)
    reference = Thinker.from_pretrained(tmp_path / "hf", dtype=torch.float32).state_dict()
    model = Thinker._from_config(Qwen3OmniMoeConfig(**config).thinker_config, dtype=torch.float32)
    assert fill_hf(model, config, seed=3) == len(list(model.parameters()))
    differ = [k for k, v in model.state_dict().items() if not torch.equal(v, reference[k])]
    assert not differ, differ[:5]
    fill_hf(model, config, seed=4)  # another seed: other weights (the check above can fail)
    assert not torch.equal(model.state_dict()["lm_head.weight"], reference["lm_head.weight"])


@pytest.fixture(scope="module")
def smoke(tiny_hf_dir, tmp_path_factory):
    from omni_model.data.datajuicer import validate
    from omni_model.data.demo import generate_demo
    from omni_model.data.shards import write_shards
    from train_throughput import SMOKE, main

    root = tmp_path_factory.mktemp("train_smoke")
    # 12 demo samples hold every media kind (images, audio, a video) and text-only ones; shards at the --smoke row
    # length, so no sample is dropped later by the loader as over-long
    records, _, _ = validate(generate_demo(root / "raw", 12, seed=5))
    (root / "processed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_shards(root / "processed.jsonl", root / "shards", tiny_hf_dir, val_fraction=0.1, seed=0,
                 max_seq_len=SMOKE["seq_len"])
    code = main(["--smoke", "--shards", str(root / "shards"), "--work", str(root / "work"),
                 "--json", str(root / "out.json")])
    return code, json.loads((root / "out.json").read_text()), root


def test_every_row_measures_every_kind_twice(smoke):
    code, out, _ = smoke
    assert code == 0, [r.get("failed", "")[-500:] for r in out["rows"] + out["processes"] if "failed" in r]
    labels = sorted(r["row"] for r in out["rows"])
    expected = [f"ours[base] {k} #{i}" for k in ("mm", "text") for i in (1, 2)]
    expected += [f"hf[{a}] {k} #{i}" for a in ("sdpa", "padded") for k in ("mm", "text") for i in (1, 2)]
    expected += [f"hf[sdpa+fp32] text #{i}" for i in (1, 2)]  # --precision-kinds text
    assert labels == sorted(expected)
    assert [p["row"] for p in out["processes"]] == ["ours[base]"] + [f"hf[{a}]" for a in HF_ROWS]
    for p in out["processes"]:
        assert p["wall_s"] > p["build_s"] > 0 and p["estimate_s"] > 0
    for r in out["rows"]:
        assert r["timed_steps"] == 1 and r["warmup_steps"] == (0 if r["repeat"] else 1)  # --smoke's rewarmup 0
        assert r["wall_s"] > 0 and r["compiles_in_timed_steps"] == 0
    assert out["data"]["mm_padded"]["rows"] > out["data"]["mm@1"]["rows"]  # one sample per padded row


def test_json_fields_and_their_relations(smoke):
    _, out, _ = smoke
    for key in ("tokens_per_s_ours", "tokens_per_s_transformers", "ratio_vs_transformers", "mfu_ours",
                "tokens_per_s_ours_text", "ratio_vs_transformers_text", "planned_gib_ours", "mem_gib_ours",
                "best_transformers_row", "ratio_vs_best_transformers", "transformers_rows", "card", "loss_check",
                "planned_allocated_gib_ours", "processes", "budget_s"):
        assert key in out, key
    assert out["card"] == out["device"] == "cpu"
    rows = {r["row"]: r for r in out["transformers_rows"]}
    assert sorted(rows) == sorted([f"hf[{a}] {k}" for a in ("sdpa", "padded") for k in ("mm", "text")]
                                  + ["hf[sdpa+fp32] text"])
    measured = {}
    for r in out["rows"]:
        measured.setdefault((r["impl"], r["variant"], r["kind"]), []).append(r["tokens_per_s"])
    for name, r in rows.items():
        variant, kind = name[3:].split("] ")
        runs = measured[("hf", variant, kind)]
        assert sorted(r["tokens_per_s_runs"]) == sorted(runs) and len(runs) == 2
        assert r["tokens_per_s"] == max(runs)
        assert r["spread"] == pytest.approx((max(runs) - min(runs)) / min(runs))
    for kind, suffix in (("mm", ""), ("text", "_text")):
        bf16_rows = {n: r for n, r in rows.items() if n.endswith(f" {kind}") and "+fp32" not in n}
        fastest = max(bf16_rows, key=lambda n: bf16_rows[n]["tokens_per_s"])
        assert out["best_transformers_row"][kind] == fastest
        ours = max(measured[("ours", "base", kind)])
        assert out[f"tokens_per_s_ours{suffix}"] == ours
        assert out["ratio_vs_best_transformers"][kind] == pytest.approx(ours / rows[fastest]["tokens_per_s"])


def test_first_step_loss_of_ours_equals_transformers(smoke):
    """Same seeded weights, same packed batches, fp32 on the CPU: the LM loss of the first step agrees (the padded
    row trains other batches and the +fp32 row starts on text: neither is compared)."""
    _, out, _ = smoke
    checks = {c["row"]: c for c in out["loss_check"]}
    assert list(checks) == ["hf[sdpa]"], checks
    check = checks["hf[sdpa]"]
    assert check["kind"] == "mm" and check["ok"]
    assert check["abs_diff"] < 1e-4, check
    assert check["ours"] > 5.0  # a real loss (ln of the tiny vocab is ~11.9), not zero


def test_a_second_run_in_the_same_work_dir_loads_the_batches_unless_their_settings_changed(smoke, capsys):
    """--work keeps the encoded batches (a lent machine's second call skips minutes of encoding): the same settings
    load them; another --padded-split encodes anew, its padded batches holding 1/N of the tokens, N times as many."""
    from train_throughput import cached_or_encoded, parse_args, write_hf_dir

    _, out, root = smoke
    work, argv = root / "work", ["--smoke", "--shards", str(root / "shards")]
    kinds, micro = ["mm", "text"], {"ours": 1, "hf": 1}
    args = parse_args(argv)
    hf_dir = write_hf_dir(work, args.tiny, args.layers)
    batches = cached_or_encoded(work, hf_dir, args, kinds, micro)
    assert "the ones encoded in" in capsys.readouterr().out
    assert {k: len(v) for k, v in batches.items()} == {k: d["micro_batches"] for k, d in out["data"].items()}
    split = cached_or_encoded(work, hf_dir, parse_args(argv + ["--padded-split", "2"]), kinds, micro)
    assert "the ones encoded in" not in capsys.readouterr().out
    assert json.loads((work / "batches.json").read_text())["settings"]["padded_split"] == 2
    for kind in kinds:
        whole, halves = batches[f"{kind}_padded"], split[f"{kind}_padded"]
        assert len(halves) == 2 * len(whole)
        per_batch = [sum(b.num_tokens for b in lst) / len(lst) for lst in (whole, halves)]
        assert per_batch[1] < 0.75 * per_batch[0], per_batch
    # a list of more steps' batches serves a run of fewer steps; a run of more steps encodes anew
    for steps, loaded in ((0, True), (2, False)):
        fewer_or_more = parse_args(argv + ["--padded-split", "2"])
        fewer_or_more.steps = steps  # (--smoke sets --steps)
        again = cached_or_encoded(work, hf_dir, fewer_or_more, kinds, micro)
        assert ("the ones encoded in" in capsys.readouterr().out) is loaded, steps
        expected = len(split["text@1"]) if loaded else fewer_or_more.warmup + steps  # one micro-batch a step
        assert len(again["text@1"]) == expected, steps

def test_encode_only_leaves_the_batches_for_a_later_run_and_trains_nothing(tmp_path, smoke, capsys):
    """--encode-only (the first call of a split device session): the batches in --work, no row, no json."""
    from train_throughput import main

    _, _, root = smoke
    work, result = tmp_path / "work", tmp_path / "out.json"
    argv = ["--smoke", "--shards", str(root / "shards"), "--work", str(work), "--json", str(result)]
    assert main(argv + ["--encode-only"]) == 0
    assert not result.exists() and "ours[" not in capsys.readouterr().out
    assert set(json.loads((work / "batches.json").read_text())["keys"]) >= {"mm@1", "text@1"}


def test_the_visual_variant_turns_the_joint_vision_forward_off():
    """`--variants visual=apart`: images and videos through the vision tower in two forwards (the same-run baseline of
    PerfOptions.joint_visual_forward); base keeps the joint forward, another value is refused."""
    from train_throughput import apply_variant, parse_variant

    assert apply_variant(parse_variant("base"))[3].joint_visual_forward is True
    options = apply_variant(parse_variant("visual=apart+towerrope=mcore"))[3]
    assert options.joint_visual_forward is False and options.tower_rope_tables is False
    with pytest.raises(SystemExit, match="only visual=apart"):
        apply_variant(parse_variant("visual=mcore"))


def test_the_towers_variant_runs_the_frozen_towers_per_micro_batch():
    """`--variants towers=per-micro-batch`: the frozen towers in every micro-batch's forward (the same-run baseline of
    PerfOptions.step_tower_forward); base runs them once per step, another value is refused, and it combines with
    visual=apart."""
    from train_throughput import apply_variant, parse_variant

    assert apply_variant(parse_variant("base"))[3].step_tower_forward is True
    options = apply_variant(parse_variant("towers=per-micro-batch+visual=apart"))[3]
    assert options.step_tower_forward is False and options.joint_visual_forward is False
    with pytest.raises(SystemExit, match="only towers=per-micro-batch"):
        apply_variant(parse_variant("towers=step"))


def test_the_lookahead_variant_runs_each_steps_towers_at_its_start():
    """`--variants lookahead=off`: the same-run baseline of PerfOptions.tower_lookahead; base reads ahead."""
    from train_throughput import apply_variant, parse_variant

    assert apply_variant(parse_variant("base"))[3].tower_lookahead is True
    options = apply_variant(parse_variant("lookahead=off"))[3]
    assert options.tower_lookahead is False and options.step_tower_forward is True
    with pytest.raises(SystemExit, match="only lookahead=off"):
        apply_variant(parse_variant("lookahead=on"))


def test_ours_and_transformers_time_the_same_batches_in_every_block(smoke):
    """Each block of a row trains on the same batches of its kind's list as the same block of the packed
    transformers row: ours reads the next step's first micro-batches ahead (PerfOptions.tower_lookahead), and a
    block of another kind (a switch of the Feed's list) must start from its own list, not from what was read ahead
    from the last block's (the smoke's second visit has no warm-up step to hide it)."""
    _, out, _ = smoke
    rows = {r["row"]: r for r in out["rows"]}
    for kind in ("mm", "text"):
        for repeat in (1, 2):
            ours, theirs = rows[f"ours[base] {kind} #{repeat}"], rows[f"hf[sdpa] {kind} #{repeat}"]
            assert ours["tokens_per_step"] == theirs["tokens_per_step"], (kind, repeat)
