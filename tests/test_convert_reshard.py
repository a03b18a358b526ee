"""Resharding through the converted checkpoint (torchrun, gloo, fp32): written at one layout, loaded at another, the
thinker's logits on a text+image+audio+video batch equal the single-process ones (<= 1e-5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from workflow_utils import REPO

_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")


@pytest.fixture(scope="module")
def reference(tiny_hf_dir, tmp_path_factory):
    """Single-process logits of the HF-loaded thinker, computed in a subprocess (keeps pytest free of dist)."""
    path = tmp_path_factory.mktemp("reshard") / "ref.pt"
    code = f"""
import sys, torch, warnings; warnings.filterwarnings('ignore'); torch.set_num_threads(1)
sys.path.insert(0, {str(REPO / 'tests')!r})
from thinker_inputs import build_inputs, load_processors
from omni_model.runtime.parallel import init_parallel
from omni_model.model.thinker import build_thinker
from omni_model.convert.mapping import load_hf_into_model
from omni_model.data.rope_index import rope_index
init_parallel()
hf = {str(tiny_hf_dir)!r}
inputs = build_inputs(load_processors(hf), n_images=1, audio_seconds=(1.5,), video_frames=4)
inputs.pop("video_second_per_grid")
ids = inputs["input_ids"]  # pad the text to a multiple of 4 tokens: sequence parallelism splits the sequence over TP
inputs["input_ids"] = torch.cat([ids, torch.full((1, -ids.shape[1] % 4), 151643)], dim=1)
s = inputs["input_ids"].shape[1]
inputs["position_ids"] = torch.arange(s).view(1, 1, -1).expand(3, 1, -1).clone()
m = build_thinker(hf).eval(); load_hf_into_model(m, hf, prefix="")
with torch.no_grad():
    logits = m(**inputs)
torch.save(dict(inputs=inputs, logits=logits), {str(path)!r})
"""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=dict(env, OMP_NUM_THREADS="1"),
                   timeout=600)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("write,load,procs", [("tp=1", "tp=2,ep=2", 2), ("tp=2,pp=2,first=3", "tp=1", 4)],
                         ids=["tp1_to_tp2ep2", "tp2pp2_to_tp1"])
def test_written_at_one_layout_loads_at_another(tiny_hf_dir, reference, tmp_path, write, load, procs):
    """One torchrun per direction: tp2+pp2 needs 4 ranks, so that direction runs 4 processes. The tiny model's 3
    deepstack layers must sit on the first stage: 3 of its 4 layers there (uneven stages, placed by mcore)."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           str(REPO / "tests" / "dist" / "convert_reshard.py"), str(tiny_hf_dir), str(reference), str(tmp_path),
           write, load]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads((tmp_path / "result.json").read_text())
    print(f"written at {write} {result['written_layout']}, loaded at {load}: max abs logit error "
          f"{result['max_abs_error']:.2e}")
    assert result["max_abs_error"] <= 1e-5
