"""The memory planner (omni_model.plan): exact parameter / gradient / optimizer-state figures per rank against models
built at those layouts, refusal of a layout that cannot fit (with layouts that do), and the 30B configs it accepts.
Activation estimates vs measured GPU peaks: bench/planner_check.py (H200)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from omni_model.configs import released_30b_a3b_config
from omni_model.plan import (GIB, Layout, PlanError, Workload, check_run, estimate, load_pipeline_config, main,
                             model_config_of, optimizer_bytes, stage_params, world_size_of)

REPO = Path(__file__).resolve().parents[1]
CONFIGS_30B = sorted(REPO.glob("config/qwen3-omni-30b-a3b-*gpu*.yaml"))
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def test_30b_counts_equal_the_meta_built_thinker():
    # the numbers tests/test_llm_meta.py and tests/test_thinker_meta.py count on meta-device models
    counts = stage_params(released_30b_a3b_config(), Layout())
    print(f"30B tp1: LLM dense {counts.llm_dense:,} + experts {counts.llm_expert:,}, vision {counts.vision:,}, "
          f"audio {counts.audio:,}")
    assert counts.llm_dense + counts.llm_expert == 30_532_646_912
    assert (counts.vision, counts.audio) == (538_631_408, 647_927_168)


def test_audio_tower_split_rule_is_the_models():
    from omni_model.model.audio import audio_replicated
    from omni_model.plan import audio_tp

    audio = released_30b_a3b_config()["thinker_config"]["audio_config"]
    for tp in (1, 2, 4, 8):
        assert (audio_tp(audio, tp) == 1 and tp > 1) == audio_replicated(audio, tp), tp


@pytest.mark.slow
def test_per_rank_figures_equal_built_training_objects(tiny_hf_dir, tmp_path):
    """tp2 / ep2 / tp2+ep2 with freeze switches on gloo: every rank's parameters by kind, trainable count, DDP grad
    buffer and Adam state bytes (mcore's plain optimizer, fp32) == the planner's, exactly."""
    out = tmp_path / "counts.json"
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(REPO / "tests/dist/plan_counts.py"), str(tiny_hf_dir), str(out)], check=True, cwd=REPO,
                   env=dict(env, OMP_NUM_THREADS="1"), timeout=900)
    hf_config = json.loads((Path(tiny_hf_dir) / "config.json").read_text())
    results = json.loads(out.read_text())
    assert len(results) == 4
    for name, result in results.items():
        p = {"tp": 1, "ep": 1, **result["parallel"]}
        for rank in result["ranks"]:
            layout = Layout(tp=p["tp"], ep=p["ep"], dp=2 // p["tp"], distributed_optimizer=False)
            assert (rank["dp"], rank["expert_dp"]) == (layout.dp, layout.expert_dp), name
            work = Workload(bf16=False, **result["freeze"])
            est = estimate(hf_config, layout, work)
            planned = {"llm_dense": est.params.llm_dense, "llm_expert": est.params.llm_expert,
                       "vision": est.params.vision, "audio": est.params.audio}
            print(f"{name} rank {rank['rank']}: built {rank['params']} trainable {rank['trainable']:,} grad buffer "
                  f"{rank['grad_elements']:,} Adam state {rank['optimizer_bytes']:,} B; planned {planned} trainable "
                  f"{est.trainable:,} Adam state {optimizer_bytes(est.params, layout, work):,} B")
            assert rank["params"] == planned, name
            assert rank["trainable"] == est.trainable == rank["grad_elements"], name
            assert est.parts["grads"] == 4 * rank["grad_elements"], name
            assert rank["optimizer_bytes"] == est.parts["optimizer"] == optimizer_bytes(est.params, layout, work)


def test_distributed_optimizer_divides_state_over_data_parallel_ranks():
    hf = released_30b_a3b_config()
    layout = Layout(tp=2, ep=8, dp=8)
    work = Workload()
    params = stage_params(hf, layout)
    # dense params over DP = 8, experts over expert-DP = 16 / (ep 8 x etp 1) = 2
    assert layout.expert_dp == 2
    dense = params.llm_dense + params.vision + params.audio
    assert optimizer_bytes(params, layout, work) == 12 * (-(-dense // 8) + -(-params.llm_expert // 2))
    assert optimizer_bytes(params, Layout(tp=2, ep=8, dp=8, distributed_optimizer=False), work) == 12 * params.total


def test_refuses_a_layout_that_cannot_fit_and_lists_layouts_that_do():
    hf = released_30b_a3b_config()
    train = {"micro_batch_size": 1, "global_batch_size": 64, "seq_len": 4096, "recompute": "none",
             "freeze_llm": False, "freeze_vision": False, "freeze_audio": False, "gpus_per_node": 8,
             "gpu_memory_gib": 79.6}
    with pytest.raises(PlanError) as refused:
        check_run(hf, train, {"tp": 1, "pp": 1, "ep": 8, "etp": 1, "cp": 1}, 16, on_gpu=True)
    message = str(refused.value)
    print(message)
    assert "tp1 pp1 ep8 etp1 dp16" in message and "train.gpu_memory_gib = 79.6" in message
    listed = re.findall(r"^(tp\d+ pp\d+ ep\d+ etp\d+ dp\d+ distopt.*?)\s+\|.*\|\s+([\d.]+) GiB$",
                        message.split("Layouts that fit")[1], flags=re.M)
    assert listed, "no fitting layout listed"
    for describe, total in listed:
        assert float(total) <= 79.6, describe
    # the listed first layout really passes the check
    tp, pp, ep, etp = (int(x) for x in re.match(r"tp(\d+) pp(\d+) ep(\d+) etp(\d+)", listed[0][0]).groups())
    recompute = "full" if "recompute full" in listed[0][0] else "none"
    check_run(hf, {**train, "recompute": recompute}, {"tp": tp, "pp": pp, "ep": ep, "etp": etp, "cp": 1}, 16, True)


@pytest.mark.parametrize("path", CONFIGS_30B, ids=lambda p: p.stem)
def test_30b_config_is_accepted_with_the_estimate_in_its_comment(path, capsys):
    config = load_pipeline_config([str(path)], root=REPO)
    train = config["train"]
    est = check_run(model_config_of(config, root=REPO), train, config["parallel"], world_size_of(train), True)
    stated = float(re.search(r"~([\d.]+) GiB per GPU of ([\d.]+)", path.read_text()).group(1))
    print(f"{path.name}: {est.describe()} ~{est.total / GIB:.1f} GiB of {train['gpu_memory_gib']} (comment {stated})")
    assert round(est.total / GIB, 1) == stated
    assert est.total <= train["gpu_memory_gib"] * GIB
    assert main(["--config", str(path)]) == 0
    assert "fits:" in capsys.readouterr().out


def test_30b_configs_cover_the_gpu_counts_and_both_sft_kinds():
    names = {p.stem for p in CONFIGS_30B}
    for gpus in ("8gpu", "16gpu", "32gpu"):
        assert any(gpus in n and "frozen-towers" in n for n in names), gpus
        assert any(gpus in n and "frozen-towers" not in n for n in names), gpus


@pytest.mark.slow
def test_the_plan_rule_reports_a_30b_config_and_refuses_one_that_does_not_fit(tmp_path):
    """(Every shipped config's Slurm dry run of finetune: tests/test_plan_time_checks.py.)"""
    from workflow_utils import snakemake, workflow_copy

    work = workflow_copy(tmp_path / "wf")
    (work / "data").mkdir()
    (work / "data" / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                                '{"role": "assistant", "content": "hello"}]}\n')
    config = str(CONFIGS_30B[0].relative_to(REPO))
    ran = snakemake(work, "plan", "--cores", "1", "--configfile", config, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "fits:" in (work / "results" / "plan.txt").read_text()
    refused = snakemake(work, "plan", "--cores", "1", "--configfile", config, "--config", "train={gpu_memory_gib: 20}",
                        timeout=300)
    print(refused.stderr[-1500:])
    assert refused.returncode != 0
    assert "above train.gpu_memory_gib = 20" in refused.stderr and "Layouts that fit" in refused.stderr


@pytest.mark.slow
def test_cpu_training_step_matches_the_planner():
    """bench/planner_check.py's CPU path, one setting (4 layers of a wider tiny MoE, seq 512, towers training, image
    + audio in the batch): 3 training steps through omni_model.train's build + step code; parameter, DDP grad-buffer
    and Adam-state bytes counted from the tensors == the planner's, exactly; the bytes autograd saves in the forward
    (saved-tensor hooks) within 15 % of the planner's activations + towers + saved logits, also without the logits."""
    setting = {"layers": 4, "seq_len": 512, "recompute": "none", "freeze_towers": False}
    env = dict({k: v for k, v in os.environ.items() if k not in _DIST_VARS}, OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO / "bench/planner_check.py"), "--cpu", "--tiny", "--one",
                           json.dumps(setting)], capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert found, proc.stderr[-3000:]
    row = json.loads(found[-1][len("RESULT "):])
    print(f"static parts planner == tensors: {row['static_match']}; autograd-saved {row['saved_bytes_gib']:.4f} GiB vs "
          f"estimate {row['estimate_saved_gib']:.4f} ({100 * row['saved_error']:+.1f} %, without the logits "
          f"{100 * row['saved_layers_error']:+.1f} %); losses {row['losses']}")
    assert row["static_match"] == {"weights": True, "grads": True, "optimizer": True}
    assert abs(row["saved_error"]) < 0.15 and abs(row["saved_layers_error"]) < 0.15
    assert all(loss == loss for loss in row["losses"])  # finite steps: the run really trained


def test_pipeline_layouts_keep_the_deepstack_layers_on_the_first_stage():
    """The tiny model (4 decoder layers, 3 deepstack features): the planner's pp2 layouts split 3 + 1
    (parallel.first_stage_layers 3), and the stage figures follow that split."""
    from omni_model.configs import tiny_config
    from omni_model.plan import candidate_layouts

    config = tiny_config()
    piped = [layout for layout in candidate_layouts(config, 2, 2) if layout.pp == 2]
    assert piped and {layout.first_stage_layers for layout in piped} == {3}
    first, last = (stage_params(config, piped[0], stage) for stage in (0, 1))
    whole = stage_params(config, Layout())
    assert (first.llm_expert, last.llm_expert) == (3 * whole.llm_expert // 4, whole.llm_expert // 4)
    assert first.vision == whole.vision and last.vision == 0


def test_context_parallel_divides_the_per_rank_activations():
    """parallel.cp: each CP rank keeps 1/cp of every packed row (plus the row's gathered K/V in attention), so the
    30B's per-rank LLM activations and saved logits fall with cp at a long sequence; the towers run on the whole
    micro-batch on every CP rank (model.context_parallel), so theirs do not."""
    hf = released_30b_a3b_config()
    work = Workload(seq_len=32768, freeze_vision=True)
    rows = {cp: estimate(hf, Layout(ep=8, cp=cp, dp=8 // cp), work) for cp in (1, 2, 4, 8)}
    for cp, est in rows.items():
        print(f"cp{cp}: {est.describe()}: activations {est.parts['activations'] / GIB:.1f} GiB, logits "
              f"{est.parts['logits'] / GIB:.1f}, towers {est.parts['towers'] / GIB:.1f}, total {est.total / GIB:.1f}")
    acts = [rows[cp].parts["activations"] for cp in (1, 2, 4, 8)]
    assert all(later < earlier for earlier, later in zip(acts, acts[1:]))
    # 1/cp of the row's activations, plus K/V of the whole row: 2 x 4 KV heads x 128 of 5,120 attention+MoE values
    for cp in (2, 4, 8):
        assert acts[0] / cp < rows[cp].parts["activations"] < 1.1 * acts[0] / cp, cp
        assert rows[cp].parts["logits"] == rows[1].parts["logits"] // cp
        assert rows[cp].parts["towers"] == rows[1].parts["towers"]
    assert "cp2 dp4" in rows[2].describe()


def test_chunked_loss_bounds_the_logits_to_one_chunk():
    """train.loss_chunk_tokens (model.chunked_loss): a rank's logits exist one chunk at a time, so a 128k-token row
    at cp2 (64k tokens a rank) plans 8k rows of logits at chunks of 8k, not 64k; every other part is unchanged. The
    schema's default (32768) leaves rows up to that size as they were; the train section's value reaches the plan."""
    from omni_model.plan import workload_of
    from omni_model.schema import TrainConfig

    hf = released_30b_a3b_config()
    layout = Layout(ep=8, cp=2, dp=4)
    whole = estimate(hf, layout, Workload(seq_len=131072, freeze_vision=True))
    chunked = estimate(hf, layout, Workload(seq_len=131072, freeze_vision=True, loss_chunk_tokens=8192))
    print(f"128k row at cp2: logits {whole.parts['logits'] / GIB:.1f} GiB whole, {chunked.parts['logits'] / GIB:.1f} "
          f"GiB in chunks of 8192 tokens; total {whole.total / GIB:.1f} -> {chunked.total / GIB:.1f} GiB")
    assert chunked.parts["logits"] * 8 == whole.parts["logits"]
    assert {k: v for k, v in chunked.parts.items() if k != "logits"} == {
        k: v for k, v in whole.parts.items() if k != "logits"}
    default = workload_of(TrainConfig.of({"seq_len": 4096}), dp=4, on_gpu=True)
    assert default.loss_chunk_tokens == 32768
    assert estimate(hf, layout, default).parts == estimate(hf, layout, Workload(seq_len=4096)).parts
    assert workload_of(TrainConfig.of({"loss_chunk_tokens": 512}), dp=4, on_gpu=True).loss_chunk_tokens == 512
