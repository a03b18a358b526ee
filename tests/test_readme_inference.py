"""README.md's inference example runs as written (issue 26 finding 9: the README had none): its python block, with
the export path pointed at the tiny checkpoint (the export's format: tests/test_export_generation.py), prints the
greedy continuation that transformers' thinker generates on its own from the same chat prompt."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROMPT = "What is the capital of France?"


def readme_inference_block() -> str:
    section = (REPO / "README.md").read_text().split("## Inference with the export", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_inference_example_prints_the_thinkers_greedy_text(tiny_hf_dir, tmp_path):
    from transformers import AutoTokenizer, Qwen3OmniMoeThinkerForConditionalGeneration

    block = readme_inference_block()
    assert 'path = "results/export/hf"' in block and PROMPT in block
    script = tmp_path / "inference.py"
    script.write_text(block.replace('"results/export/hf"', repr(str(tiny_hf_dir))))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]

    new_tokens = int(re.search(r"thinker_max_new_tokens=(\d+)", block).group(1))
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    thinker = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype="auto").eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
                                           tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = thinker.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    expected = tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(repr(expected))
    assert expected.strip() and ran.stdout.endswith(expected + "\n"), ran.stdout[-500:]
