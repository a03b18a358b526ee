"""Bounded conversion memory, measured: converting 7 LLM layers takes no more host memory than converting 3 (peak RSS
growth within one layer's tensors), because convert fills and saves one save group at a time (convert.grouped_save).

Deterministic: each conversion runs in a fresh process and reports its own high-water mark (VmHWM) over its RSS
after the imports; no sampling, no timing. Before the grouped save the difference was the 4 extra layers twice over
(the whole model + dist_checkpointing's copy of the experts' views)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# MoE layers of 16 experts x (3 x 512 x 1024): ~100 MB fp32 per layer; small vocab and towers, so the layers dominate
EXPERTS, FFN, HIDDEN = 16, 512, 1024
LAYER_BYTES = 4 * EXPERTS * 3 * FFN * HIDDEN


def tiny_config(layers: int) -> dict:
    from omni_model.tiny import tiny_variant

    return tiny_variant(text=dict(vocab_size=8192, hidden_size=HIDDEN, num_attention_heads=16, num_key_value_heads=4,
                                  head_dim=16, num_experts=EXPERTS, num_experts_per_tok=4, moe_intermediate_size=FFN,
                                  num_hidden_layers=layers))


MEASURE = """
import json, sys, torch

def main():
    torch.set_num_threads(1)
    from omni_model.convert import convert_checkpoint
    from omni_model.runtime.parallel import init_parallel
    import omni_model.model.thinker, megatron.core.dist_checkpointing  # imported code is not converted data
    init_parallel()
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
    before = rss()
    record = convert_checkpoint(sys.argv[1], sys.argv[2], dtype="fp32", group_bytes=0, log=lambda _: None)
    # VmHWM: this process's own high-water mark (ru_maxrss would include the parent's from before exec)
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"before": before, "peak": peak, "groups": record["save_groups"]}))

if __name__ == "__main__":
    main()
"""


def convert_growth(tmp_path, layers: int) -> dict:
    from omni_model.tiny import write_tiny_checkpoint

    hf = write_tiny_checkpoint(tmp_path / f"hf{layers}", config=tiny_config(layers))
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(script), str(hf), str(tmp_path / f"mcore{layers}")], check=True,
                         capture_output=True, text=True, env=env, timeout=900)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    checkpoint = tmp_path / f"mcore{layers}" / "checkpoint"
    measured["checkpoint_bytes"] = sum(p.stat().st_size for p in checkpoint.glob("*.distcp"))
    measured["growth"] = measured["peak"] - measured["before"]
    return measured


@pytest.mark.slow
def test_convert_peak_memory_does_not_grow_with_depth(tmp_path):
    two, six = convert_growth(tmp_path, 3), convert_growth(tmp_path, 7)  # the tiny vision has 3 deepstack layers
    print(f"convert peak RSS growth: 3 layers {two['growth'] / 1e6:.0f} MB ({two['checkpoint_bytes'] / 1e6:.0f} MB "
          f"checkpoint, {two['groups']} save groups), 7 layers {six['growth'] / 1e6:.0f} MB "
          f"({six['checkpoint_bytes'] / 1e6:.0f} MB, {six['groups']} groups); one layer {LAYER_BYTES / 1e6:.0f} MB")
    assert six["checkpoint_bytes"] - two["checkpoint_bytes"] >= 4 * LAYER_BYTES  # the 4 extra layers were written
    assert six["groups"] == two["groups"] + 4
    assert six["growth"] - two["growth"] < LAYER_BYTES
    assert six["growth"] < 3 * LAYER_BYTES + 300e6  # ~2 x the largest group (a layer) + a constant
