"""The talker under TP2+SP, EP2, TP2+EP2+SP and TP2+ETP2+SP (`torchrun --nproc_per_node 2`, gloo) equals the
single-process talker: first-group and code-predictor logits, the training loss and its input gradients to 1e-5 of
the largest reference value (measured <= 1.3e-6; tests/dist/talker_parallel_parity.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_llm_parallel import REPO, _env, _free_port

TOLERANCE = 1e-5


def _reference(hf_dir, tmp_path):
    """The single-process run, in a subprocess (keeps this pytest process free of torch.distributed)."""
    code = f"""
import sys, torch, warnings; warnings.filterwarnings('ignore'); torch.set_num_threads(1)
sys.path.insert(0, {str(REPO / 'tests')!r}); sys.path.insert(0, {str(REPO / 'tests/dist')!r})
from llm_helpers import config_of
from talker_helpers import talker_batch
from talker_parallel_parity import run
from omni_model.runtime.parallel import init_parallel
init_parallel()
batch = talker_batch(config_of({str(hf_dir)!r}))
outputs = run({str(hf_dir)!r}, batch, 0.3)
batch.thinker_embeds.requires_grad_(False); batch.thinker_hidden.requires_grad_(False)
torch.save(dict(batch=batch, outputs=outputs, predictor_weight=0.3), {str(tmp_path / 'ref.pt')!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=_env())
    return tmp_path / "ref.pt"


@pytest.fixture(scope="module")
def sharp_dir(tiny_hf_dir, tmp_path_factory):
    from llm_helpers import sharpened_checkpoint

    return sharpened_checkpoint(tiny_hf_dir, tmp_path_factory.mktemp("sharp_talker_dist") / "hf", parts=("talker.",))


def test_talker_layouts_equal_single_process(sharp_dir, tmp_path):
    ref = _reference(sharp_dir, tmp_path)
    out = tmp_path / "dist.json"
    torchrun = Path(sys.executable).parent / "torchrun"
    subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(REPO / "tests/dist/talker_parallel_parity.py"), str(sharp_dir), str(ref), str(out)],
        check=True, cwd=REPO, env=_env(), timeout=900,
    )
    results = json.loads(out.read_text())
    print("talker parallel parity (max abs err / max |ref|):", json.dumps(results))
    assert set(results) == {"tp2_sp", "ep2", "tp2_ep2_sp", "tp2_etp2_sp"}
    for layout, errors in results.items():
        assert all(err <= TOLERANCE for err in errors.values()), (layout, errors)
