"""Streaming, measured: exporting a 1.3 GB (fp32) checkpoint grows the exporter's memory by about three loaded units
(one LLM layer each here), not by the model: peak RSS growth stays far below the checkpoint size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# 8 MoE layers of 16 experts x (3 x 768 x 1024): ~154 MB fp32 per layer; small vocab and towers so the LLM layers
# are the bulk of the checkpoint
LAYERS = 8
CONFIG = dict(text=dict(vocab_size=8192, hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, head_dim=16,
                        num_experts=16, num_experts_per_tok=4, moe_intermediate_size=768, num_hidden_layers=LAYERS))

MEASURE = """
import json, sys, torch
torch.set_num_threads(1)
from omni_model.convert.export import export_to_hf
from omni_model.runtime.parallel import init_parallel
import omni_model.convert.checkpoint, omni_model.model.thinker  # what the export imports: code is not data
init_parallel()
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
export_to_hf(sys.argv[1], sys.argv[2], sys.argv[3], log=lambda _: None)
# VmHWM: this process's own high-water mark (ru_maxrss would include the parent's from before exec)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"before": before, "peak": peak}))
"""


@pytest.mark.slow
def test_export_memory_grows_by_a_few_layers_not_by_the_model(tmp_path):
    from omni_model.convert import convert_checkpoint
    from omni_model.runtime.parallel import init_parallel
    from omni_model.tiny import tiny_variant, write_tiny_checkpoint

    hf = write_tiny_checkpoint(tmp_path / "hf", config=tiny_variant(**CONFIG))
    init_parallel()
    convert_checkpoint(hf, tmp_path / "mcore", dtype="fp32", log=lambda _: None)
    checkpoint = tmp_path / "mcore" / "checkpoint"
    checkpoint_bytes = sum(p.stat().st_size for p in checkpoint.rglob("*.distcp"))
    layer_bytes = 4 * (16 * 3 * 768 * 1024)  # the experts of one layer (the largest load unit)

    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", MEASURE, str(checkpoint), str(hf), str(tmp_path / "export")],
                         check=True, capture_output=True, text=True, env=env, timeout=600)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    growth = measured["peak"] - measured["before"]
    print(f"export of a {checkpoint_bytes / 1e9:.2f} GB fp32 checkpoint ({LAYERS} layers of "
          f"{layer_bytes / 1e6:.0f} MB experts): peak RSS growth {growth / 1e9:.2f} GB "
          f"({growth / checkpoint_bytes:.0%} of the checkpoint, {growth / layer_bytes:.1f} layers)")
    assert checkpoint_bytes > LAYERS * layer_bytes
    assert growth < 4.5 * layer_bytes
    assert growth < 0.6 * checkpoint_bytes
