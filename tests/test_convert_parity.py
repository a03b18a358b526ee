"""The convert stage's parity gate (written checkpoint vs transformers on a text+image+audio+video probe encoded by
the project's data encoder), its failure on a corrupted tensor, the CLI, and `snakemake convert` on the default."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from workflow_utils import REPO, snakemake, workflow_copy


@pytest.fixture(scope="module")
def converted(tiny_hf_dir, tmp_path_factory):
    """A conversion through the CLI (`python -m omni_model.convert`), in a subprocess like the rule runs it."""
    out = tmp_path_factory.mktemp("parity") / "mcore"
    proc = subprocess.run([sys.executable, "-m", "omni_model.convert", "--hf", str(tiny_hf_dir), "--out", str(out),
                           "--dtype", "fp32"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    progress = [line for line in proc.stdout.splitlines() if line.startswith("convert rank 0:")]
    assert len(progress) >= 3 and progress[-1].startswith("convert rank 0: checkpoint saved in"), progress
    assert re.search(r"^convert rank 0: HF tensors read: .*, tensors 207/207$", proc.stdout, re.M), progress
    return out


@pytest.fixture(scope="module")
def parallel():
    from omni_model.runtime.parallel import init_parallel

    init_parallel()


def test_parity_gate_passes_and_reports(tiny_hf_dir, converted, parallel):
    from omni_model.convert.parity import run_parity_gate

    result = run_parity_gate(tiny_hf_dir, converted, dtype="fp32")
    on_disk = json.loads((converted / "parity.json").read_text())
    print(f"parity gate fp32: max abs {on_disk['max_abs_error']:.2e}, max rel {on_disk['max_rel_error']:.2e}, "
          f"tokens {on_disk['probe_tokens']}")
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["pass"] is True and on_disk["max_abs_error"] <= 1e-4 == on_disk["tolerance"]
    tokens = on_disk["probe_tokens"]
    assert min(tokens["text"], tokens["image"], tokens["audio"], tokens["video"]) > 0
    assert on_disk["layers_compared"] == on_disk["layers_total"] and on_disk["truncated"] is False
    from importlib import metadata

    # the stack the verdict holds for, as the installed distributions name it (megatron.core.__version__ of 0.19 adds
    # the working directory's git commit; torch.__version__ its build, +cu130)
    versions = on_disk["versions"]
    for package in ("megatron-core", "torch", "transformers"):
        assert versions[package] == metadata.version(package), package


def test_parity_gate_fails_on_a_corrupted_tensor(tiny_hf_dir, converted, parallel, tmp_path):
    """The checkpoint is compared with HF files one tensor of which differs (what a broken row, a wrong transform
    or a damaged checkpoint looks like to the gate): the gate fails, names the error, and says so in parity.json.
    Also runs truncated (convert.parity_layers: 3) and reports it."""
    from safetensors.torch import load_file, save_file

    from omni_model.convert.parity import ParityError, run_parity_gate

    bad = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, bad)
    for path in bad.glob("*.safetensors"):
        tensors = load_file(str(path))
        key = "thinker.model.layers.0.self_attn.o_proj.weight"
        if key in tensors:
            tensors[key] = (tensors[key].float() * 1.05).to(tensors[key].dtype)  # 5 % off
        save_file(tensors, str(path), metadata={"format": "pt"})
    out = tmp_path / "mcore"
    shutil.copytree(converted, out)
    with pytest.raises(ParityError, match=r"differ from transformers' by \S+ \(max abs\) > tolerance 1.000e-04"):
        run_parity_gate(bad, out, dtype="fp32", layers=3)
    report = json.loads((out / "parity.json").read_text())
    print(f"corrupted o_proj (x1.05): max abs logit error {report['max_abs_error']:.2e} -> gate failed")
    assert report["pass"] is False and report["max_abs_error"] > 1e-4
    assert report["layers_compared"] == 3 and report["truncated"] is True


@pytest.mark.slow
def test_snakemake_convert_on_the_default(tmp_path):
    wf = workflow_copy(tmp_path / "wf")
    proc = snakemake(wf, "--cores", "2", "convert", timeout=1500)
    assert proc.returncode == 0, proc.stderr[-6000:]
    mcore = wf / "results" / "model" / "mcore"
    parity = json.loads((mcore / "parity.json").read_text())
    convert = json.loads((mcore / "convert.json").read_text())
    log = (wf / "logs" / "convert.log").read_text()
    print(f"snakemake convert: parity max abs {parity['max_abs_error']:.2e}, convert {convert['seconds']}")
    assert parity["pass"] is True and parity["dtype"] == "fp32"
    assert (mcore / "checkpoint" / "metadata.json").is_file() and (mcore / "tokenizer.json").is_file()
    assert not (mcore.parent / "mcore.staging").exists()
    assert re.search(r"convert rank 0: HF tensors read: .*, tensors 207/207$", log, re.M)
    assert "parity gate passed" in log
    again = snakemake(wf, "--cores", "2", "convert", "-n")
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_cli_under_torchrun_then_gate(tiny_hf_dir, tmp_path, parallel):
    """The rule's convert.procs > 1 path: the CLI on 2 ranks (tp2 + ep2) through run_torchrun, then the gate in
    this process loads that checkpoint at tp1."""
    from omni_model.convert.parity import run_parity_gate
    from omni_model.runtime.launch import run_torchrun

    out = tmp_path / "mcore"
    run_torchrun("omni_model.convert", ["--hf", str(tiny_hf_dir), "--out", str(out), "--dtype", "fp32", "--tp", "2",
                                        "--ep", "2"], nproc_per_node=2, log=tmp_path / "convert.log")
    record = json.loads((out / "convert.json").read_text())
    assert record["layout"]["tp"] == 2 and record["layout"]["ep"] == 2
    log = (tmp_path / "convert.log").read_text()
    for rank in (0, 1):  # each rank's last progress line: all of its tensors
        assert re.search(rf"convert rank {rank}: HF tensors read: .*, tensors (\d+)/\1$", log, re.M), log[-3000:]
    result = run_parity_gate(tiny_hf_dir, out, dtype="fp32")
    print(f"written at tp2+ep2 by 2 ranks, gate at tp1: max abs logit error {result['max_abs_error']:.2e}")
    assert result["pass"]


@pytest.mark.gpu
def test_parity_gate_bf16_on_gpu(tiny_hf_dir, tmp_path, parallel):
    """bf16 on the GPU: the tolerance is transformers' own bf16-vs-fp32 error + 25 % (BF16_MARGIN)."""
    from omni_model.convert import convert_checkpoint
    from omni_model.convert.parity import BF16_MARGIN, run_parity_gate

    convert_checkpoint(tiny_hf_dir, tmp_path / "mcore", dtype="bf16")
    result = run_parity_gate(tiny_hf_dir, tmp_path / "mcore", dtype="bf16")
    print(f"bf16 gate: ours {result['max_abs_error']:.2e} vs transformers' own bf16 error "
          f"{result['transformers_bf16_vs_fp32']:.2e} (tolerance {result['tolerance']:.2e})")
    assert result["pass"] and result["tolerance"] == pytest.approx(BF16_MARGIN * result["transformers_bf16_vs_fp32"])
