"""LoRA through the finetune stage's own run (`python -m omni_model.train` with train.lora, CPU, fp32, tiny model) and
its export.

* A run killed with SIGKILL after its step-3 checkpoint, then restarted, reproduces the uninterrupted run's losses
  bit for bit; its checkpoints hold adapters + optimizer (no model tensor), name the base model's digest, and are a
  small fraction of the base checkpoint.
* Export (`export.lora: both`): the merged HF checkpoint keeps every tensor no adapter touches bit-identical to the
  source; the PEFT folder loads with `peft.PeftModel.from_pretrained` onto transformers' full Qwen3-Omni; logits of
  base + PEFT adapter == merged export == our mcore thinker with the adapters, to 1e-5 relative (fp32).
* The tp1 run's adapter checkpoint resumes at tp2 + SP + etp2 (torchrun, gloo) with the same losses.
* An adapter checkpoint is refused against another base model, with a message naming both digests.
* Every target (towers included) merges through the mapping into transformers' weights: same logits as ours.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dist.finetune_setup import make_checkpoint, make_shards
from test_export import hf_tensor_differences
from test_finetune import REFERENCE, kill_after_steps, metrics, run, start, write_settings

LORA = dict(enabled=True, rank=4, alpha=8.0, targets=["attention", "experts"])
SETTINGS = dict(REFERENCE, iters=6, save_interval=3, eval_interval=3, lora=LORA)
LOGIT_TOL = 1e-5


def _hf_with_manifest(hf_dir: Path, out: Path, source: dict) -> Path:
    """A copy of the tiny HF dir with its weights in fp32 (the tiny model is saved in bf16: a merged export would
    round W + BA to bf16, and the logit comparisons are fp32) and the download stage's MANIFEST.json."""
    from safetensors.torch import load_file, save_file

    from omni_model.download import write_manifest

    shutil.copytree(hf_dir, out)
    for path in out.glob("*.safetensors"):
        save_file({k: v.float() for k, v in load_file(path).items()}, str(path), metadata={"format": "pt"})
    write_manifest(out, source)
    return out


@pytest.fixture(scope="module")
def inputs(tiny_hf_dir, tmp_path_factory):
    """The pipeline's layout: an HF dir with the download stage's MANIFEST.json, and the converted checkpoint at
    mcore/checkpoint beside a convert.json naming that manifest's digest."""
    from omni_model.convert.checkpoint import manifest_digest

    root = tmp_path_factory.mktemp("lora_finetune")
    hf = _hf_with_manifest(tiny_hf_dir, root / "hf", {"kind": "tiny", "seed": 0})
    checkpoint = make_checkpoint(hf, root / "mcore" / "checkpoint")
    (root / "mcore" / "convert.json").write_text(json.dumps({"source": {"manifest": manifest_digest(hf)}}))
    return {"hf": hf, "checkpoint": checkpoint, "root": root,
            "shards": make_shards(hf, root / "data", n_samples=16, max_seq_len=1024)}


@pytest.fixture(scope="module")
def reference(inputs):
    train_dir = inputs["root"] / "reference"
    run(write_settings(inputs, train_dir, **SETTINGS), inputs["root"] / "reference.log")
    return {"dir": train_dir, "metrics": metrics(train_dir)}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


@pytest.mark.slow
def test_lora_checkpoints_hold_adapters_and_resume_exactly(inputs, reference):
    from megatron.core import dist_checkpointing

    from omni_model.convert.checkpoint import manifest_digest

    saved = reference["dir"] / "iter_0000003"
    state = json.loads((saved / "train_state.json").read_text())
    assert state["base_digest"] == manifest_digest(inputs["hf"]) and state["lora"]["rank"] == 4
    keys = dist_checkpointing.load_tensors_metadata(str(saved)).keys()
    assert not [k for k in keys if k.startswith(("language_model.", "vision_model.", "audio_model."))]
    assert any(k.startswith("lora.") for k in keys) and any("exp_avg" in k for k in keys)
    size, base = _dir_bytes(saved), _dir_bytes(inputs["checkpoint"])
    print(f"LoRA checkpoint {size / 1e6:.2f} MB (adapters + Adam states) vs base checkpoint {base / 1e6:.2f} MB")
    assert size < 0.25 * base

    train_dir = inputs["root"] / "killed"
    settings = write_settings(inputs, train_dir, **SETTINGS)
    log = inputs["root"] / "killed.log"
    kill_after_steps(start(settings, log), train_dir, 4)
    assert (train_dir / "iter_0000003").is_dir() and not (train_dir / "iter_0000006").exists()
    (train_dir / "latest").unlink(missing_ok=True)  # Snakemake deletes the rule's outputs before a rerun
    (train_dir / "metrics.jsonl").unlink()
    output = run(settings, log)
    assert "resuming from" in output and "iter_0000003" in output
    resumed, expected = metrics(train_dir), reference["metrics"]
    for a, b in zip(resumed, expected):
        print(f"step {a['step']}: resumed {a['loss']!r} uninterrupted {b['loss']!r}")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in expected]  # exact, fp32
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in expected]
    assert expected[-1]["loss"] < expected[0]["loss"]


@pytest.mark.slow
def test_lora_checkpoint_resumes_at_tp2_with_etp2(inputs, reference):
    """The tp1 run's step-3 adapter checkpoint continues under torchrun at tp2 + SP + etp2 (2 ranks, gloo): adapters
    and their Adam states reshard (the experts' fc1 B by its gate/up parts), the data stream continues (same
    data-parallel size) and steps 4-6 equal the tp1 run's to fp32 reduction-order noise."""
    from omni_model.runtime.launch import run_torchrun

    root = inputs["root"]
    tp2 = root / "tp2"
    tp2.mkdir()
    shutil.copytree(reference["dir"] / "iter_0000003", tp2 / "iter_0000003")
    settings = write_settings(inputs, tp2, **dict(SETTINGS, cpu_procs=2))
    data = json.loads(settings.read_text())
    data["parallel"] = {"tp": 2, "etp": 2}
    settings.write_text(json.dumps(data))
    run_torchrun("omni_model.train", ["--settings", str(settings)], nproc_per_node=2, log=root / "tp2.log")
    log = (root / "tp2.log").read_text()
    assert "resumed at another layout" in log and "the data stream continues" in log
    resumed, expected = metrics(tp2), reference["metrics"]
    assert [r["step"] for r in resumed] == list(range(1, 7))
    worst = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(resumed[3:], expected[3:]))
    for a, b in zip(resumed[3:], expected[3:]):
        print(f"step {a['step']}: tp2+etp2 {a['loss']!r} vs tp1 {b['loss']!r}; grad norm {a['grad_norm']:.6f} vs "
              f"{b['grad_norm']:.6f}")
        assert a["tokens"] == b["tokens"] and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    print(f"LoRA tp1 -> tp2+etp2 resume: worst relative loss difference over steps 4-6 {worst:.1e}")
    assert worst < 1e-5


def test_lora_under_full_recompute_trains_as_without_it(inputs, reference):
    """train.recompute full (the released model's one-GPU LoRA configs): mcore recomputes each layer in a reentrant
    Function whose output needs grad only if an input does, and the frozen embedding's does not; the adapters still
    get their gradients (the full-depth run on an H100 trained with grad norm 0 before), so every step's loss, grad
    norm and router aux loss equal the run without recompute to fp32 noise. Three steps, no save or eval, against
    the reference's first three: a step's figures come before its update, so step 3's depend on the updates of steps
    1-2, both in the two warm-up steps, whose learning rates do not depend on train.iters."""
    train_dir = inputs["root"] / "full_recompute"
    settings = dict(SETTINGS, recompute="full", iters=3, save_interval=0, eval_interval=0)
    run(write_settings(inputs, train_dir, **settings), inputs["root"] / "full_recompute.log")
    recomputed, expected = metrics(train_dir), reference["metrics"][:3]
    assert [r["step"] for r in recomputed] == [1, 2, 3]
    for a, b in zip(recomputed, expected):
        assert b["grad_norm"] > 0 and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["moe_aux_loss"] == pytest.approx(b["moe_aux_loss"], rel=1e-5)


def _our_logits_with_adapters(inputs, checkpoint: Path, batch):
    from omni_model.convert.checkpoint import load_checkpoint
    from omni_model.convert.parity import _device, our_logits
    from omni_model.model.lora import adapter_parameters, full_adapters_from_checkpoint, inject_lora
    from omni_model.model.thinker import build_thinker
    from omni_model.train.settings import LoraSpec

    thinker = build_thinker(inputs["hf"], perform_initialization=False).eval()
    load_checkpoint(thinker, inputs["checkpoint"])
    inject_lora(thinker, LoraSpec.of(LORA), seed=0, initialise=False)
    adapters = full_adapters_from_checkpoint(checkpoint)
    with torch.no_grad():
        for key, param, _ in adapter_parameters(thinker):
            param.copy_(adapters[key])
    return our_logits(thinker, batch, _device())


def _peft_logits(inputs, adapter_dir: Path, batch):
    from peft import PeftModel
    from transformers import Qwen3OmniMoeForConditionalGeneration

    from omni_model.convert.parity import _device, reference_logits

    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(inputs["hf"]), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    thinker = model.base_model.model.thinker
    for module in thinker.modules():
        sub = getattr(module, "config", None)
        if sub is not None and hasattr(sub, "_experts_implementation"):
            sub._experts_implementation = "eager"
    return reference_logits(thinker, batch, _device())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.slow
def test_lora_export_merged_and_peft_agree_with_ours(inputs, reference, tmp_path):
    from omni_model.convert.export import export_lora, source_tensors
    from omni_model.convert.parity import _device, probe_batch, reference_logits, reference_thinker
    from omni_model.runtime.parallel import destroy_parallel
    from omni_model.train.checkpointing import read_latest

    checkpoint = read_latest(reference["dir"])
    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapter"
    try:
        summary = export_lora(checkpoint, inputs["hf"], mode="both", merged_dir=merged_dir, adapter_dir=adapter_dir)
        print(f"export: {summary}")
        assert (adapter_dir / "adapter_config.json").is_file() and (merged_dir / "MANIFEST.json").is_file()

        count, problems = hf_tensor_differences(inputs["hf"], merged_dir)
        merged = sorted(p.split(":")[0] for p in problems if p.endswith(": values differ"))
        print(f"merged export: {count - len(merged)} of {count} tensors bit-identical to the source, {len(merged)} "
              f"merged")
        assert len(merged) == len(problems)  # nothing missing, extra or re-typed
        assert merged == sorted(n for n in source_tensors(inputs["hf"]) if n.startswith("thinker.model.layers.")
                                and (".mlp.experts." in n or any(f".self_attn.{p}_proj." in n for p in "qkvo")))

        config = json.loads((inputs["hf"] / "config.json").read_text())
        batch, _ = probe_batch(inputs["hf"])
        ours = _our_logits_with_adapters(inputs, checkpoint, batch)
        merged_logits = reference_logits(reference_thinker(merged_dir, config, torch.float32), batch, _device())
        peft = _peft_logits(inputs, adapter_dir, batch)
        base = reference_logits(reference_thinker(inputs["hf"], config, torch.float32), batch, _device())
    finally:
        destroy_parallel()
    errors = {"ours vs peft": _rel(ours, peft), "merged vs peft": _rel(merged_logits, peft),
              "ours vs merged": _rel(ours, merged_logits)}
    print(f"logits rel error: {errors}; the adapters move the logits by {_rel(base, peft):.1e}")
    assert _rel(base, peft) > 100 * LOGIT_TOL  # the adapters matter
    assert max(errors.values()) <= LOGIT_TOL, errors


@pytest.mark.slow
def test_lora_export_refuses_another_base(inputs, reference, tmp_path):
    from omni_model.convert.export import export_lora
    from omni_model.model.lora import LoraError
    from omni_model.tiny import write_tiny_checkpoint
    from omni_model.train.checkpointing import read_latest

    other = _hf_with_manifest(write_tiny_checkpoint(tmp_path / "tiny1", seed=1), tmp_path / "other", {"seed": 1})
    with pytest.raises(LoraError, match="trained on the base model sha256:.*but the base given is sha256:"):
        export_lora(read_latest(reference["dir"]), other, mode="merged", merged_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_target_merges_into_the_hf_weights_through_the_mapping(inputs, tmp_path):
    """All targets (the towers' linears too; the tiny model has no dense MLP layer): the merged export of non-zero
    adapters, loaded by transformers, gives our model-with-adapters' logits (1e-5 relative), and merge_lora folds the
    same deltas into our own weights."""
    from omni_model.convert.export import write_merged
    from omni_model.convert.parity import _device, our_logits, probe_batch, reference_logits, reference_thinker
    from omni_model.model.lora import adapter_parameters, init_adapters, inject_lora, merge_lora
    from omni_model.model.thinker import build_thinker
    from omni_model.runtime.parallel import destroy_parallel, init_parallel
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.train.settings import LoraSpec

    spec = LoraSpec(rank=4, alpha=8.0, targets=("attention", "experts", "dense_mlp", "vision", "audio"))
    init_parallel(seed=1)
    try:
        thinker = build_thinker(inputs["hf"]).eval()
        load_hf_into_model(thinker, inputs["hf"], prefix="")
        count = inject_lora(thinker, spec, seed=3)
        init_adapters(thinker, seed=3, b_std=0.05)
        kinds = {name.split(".")[0] for name, _ in thinker.named_modules() if name.endswith(".base")}
        batch, _ = probe_batch(inputs["hf"])
        ours = our_logits(thinker, batch, _device())
        adapters = {key: param.detach().clone() for key, param, _ in adapter_parameters(thinker)}
        write_merged(adapters, spec, inputs["hf"], tmp_path / "merged", shard_size=1 << 30, provenance={})
        config = json.loads((inputs["hf"] / "config.json").read_text())
        merged = reference_logits(reference_thinker(tmp_path / "merged", config, torch.float32), batch, _device())
        merge_lora(thinker)
        folded = our_logits(thinker, batch, _device())
    finally:
        destroy_parallel()
    print(f"{count} adapted modules in {sorted(kinds)}: merged export vs ours {_rel(merged, ours):.1e}, merge_lora "
          f"vs ours {_rel(folded, ours):.1e}")
    assert kinds == {"language_model", "vision_model", "audio_model"}
    assert _rel(merged, ours) <= LOGIT_TOL and _rel(folded, ours) <= LOGIT_TOL
