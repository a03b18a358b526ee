"""TP2+SP, EP2, TP2+EP2+SP and PP2 under `torchrun --nproc_per_node 2` (gloo) reproduce the single-process logits
(with deepstack features) and the single-process training loss through mcore's forward_backward schedule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _single_process_reference(hf_dir, tmp_path):
    """(on CUDA when present: the GPU variant below reuses it)"""
    return _reference(hf_dir, tmp_path)


def _reference(hf_dir, tmp_path):
    """Single-process mcore logits + loss, computed in a subprocess (keeps this pytest process free of dist)."""
    code = f"""
import sys, torch, warnings; warnings.filterwarnings('ignore'); torch.set_num_threads(1)
sys.path.insert(0, {str(REPO / 'tests')!r})
from llm_helpers import config_of, text_batch, deepstack_inputs
from omni_model.runtime.parallel import init_parallel
from omni_model.model.language_model import build_language_model
from omni_model.convert.mapping import load_hf_into_model
init_parallel()
cfg = config_of({str(hf_dir)!r})
m = build_language_model(cfg, use_te=False); load_hf_into_model(m, {str(hf_dir)!r}); m.eval()
ids, pos = text_batch(s=16)
vmask, ds = deepstack_inputs(ids.shape, 64, 3)
if torch.cuda.is_available():
    ids, pos, vmask, ds = ids.cuda(), pos.cuda(), vmask.cuda(), [t.cuda() for t in ds]
with torch.no_grad():
    logits = m(input_ids=ids, position_ids=pos, visual_pos_masks=vmask, deepstack_visual_embeds=ds)
    m.train()
    loss = m(input_ids=ids, position_ids=pos, labels=torch.roll(ids, -1, 1), visual_pos_masks=vmask,
             deepstack_visual_embeds=ds).float().mean().item()
    loss_plain = m(input_ids=ids, position_ids=pos, labels=torch.roll(ids, -1, 1)).float().mean().item()
cpu = lambda t: t.cpu()
torch.save(dict(ids=cpu(ids), pos=cpu(pos), vmask=cpu(vmask), deepstack=[cpu(t) for t in ds], logits=cpu(logits), loss=loss, loss_plain=loss_plain), {str(tmp_path / 'ref.pt')!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=_env())
    return tmp_path / "ref.pt"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.gpu
def test_tp_ep_pp_reproduce_single_process_on_two_gpus(tiny_hf_dir, tmp_path):
    """Same check on 2 GPUs (nccl, fp32, local spec or TE spec when TE imports). Needs >= 2 CUDA devices."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    test_tp_ep_pp_reproduce_single_process(tiny_hf_dir, tmp_path)


def test_tp_ep_pp_reproduce_single_process(tiny_hf_dir, tmp_path):
    ref = _single_process_reference(tiny_hf_dir, tmp_path)
    out = tmp_path / "dist.json"
    torchrun = Path(sys.executable).parent / "torchrun"
    subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(REPO / "tests/dist/llm_parallel_parity.py"), str(tiny_hf_dir), str(ref), str(out)],
        check=True, cwd=REPO, env=_env(), timeout=600,
    )
    res = json.loads(out.read_text())
    print("parallel parity:", json.dumps(res))
    for name in ("tp2_sp", "ep2", "tp2_ep2_sp", "tp2_etp2_sp"):
        assert res[name]["logit_max_abs_err"] <= 1e-5, (name, res[name])
    for name, r in res.items():
        assert r["loss_abs_err"] <= 1e-5, (name, r)
