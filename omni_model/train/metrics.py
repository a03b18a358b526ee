"""What a training step reports: loss, lr, grad norm, real tokens/s, model TFLOP/s and MFU, memory — printed as a
progress line with ETA, appended to `metrics.jsonl` and written as TensorBoard scalars under `tb/` (rank 0).

Model FLOPs count the LLM only (the towers' share is small at the released shapes and depends on the media mix):
6 x active parameters (routed experts: top-k of them; the output layer; not the embedding lookup) per real token,
plus causal attention 6 x L^2 x heads x head_dim per layer for every conversation of length L (fwd + bwd).
Recompute is not counted (model FLOPs, not hardware FLOPs). MFU = TFLOP/s per device / peak TFLOP/s per device;
the peak is train.peak_tflops, else looked up by device name, else unknown (CPU): MFU is then null.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import torch

# dense bf16 tensor-core peak per device, TFLOP/s (vendor datasheets, without sparsity)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "B200": 2250.0, "GB200": 2500.0}


def peak_tflops(configured: Optional[float]) -> Optional[float]:
    if configured:
        return float(configured)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


class FlopCounter:
    """Model FLOPs of the thinker LLM for a list of real conversation lengths."""

    def __init__(self, hf_config):
        from omni_model.model.language_model import count_parameters
        from omni_model.model.transformer_config import text_config_of

        text = text_config_of(hf_config)
        self.active = count_parameters(text, include_embeddings=False)["active"]
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        self.attention_per_l2 = 6 * text["num_hidden_layers"] * text["num_attention_heads"] * head_dim

    def __call__(self, seq_lens: list) -> float:
        tokens = sum(seq_lens)
        return 6.0 * self.active * tokens + self.attention_per_l2 * sum(length * length for length in seq_lens)


def memory_gib() -> float:
    """Peak memory of this process: GPU allocator peak, or the resident set on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsLog:
    """Rank 0's sink: metrics.jsonl (one JSON object per step / evaluation) + TensorBoard + stdout."""

    def __init__(self, metrics_path: Path, tb_dir: Path, total_iters: int, start_iter: int, enabled: bool = True):
        self.enabled = enabled
        self.total, self.start = total_iters, start_iter
        self.started = time.monotonic()
        self.path = Path(metrics_path)
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events a killed run wrote after its last checkpoint
            self.tb = SummaryWriter(log_dir=str(tb_dir), purge_step=start_iter + 1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as sink:
            sink.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and value is not None and math.isfinite(value):
                self.tb.add_scalar(f"train/{key}" if not key.startswith("eval") else key.replace("_", "/", 1),
                                   value, step)
        self.tb.flush()

    def progress(self, record: dict) -> None:
        if not self.enabled:
            return
        step = record["step"]
        done = step - self.start
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * (self.total - step) if done else 0.0
        parts = [f"step {step}/{self.total}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.3e}",
                 f"grad-norm {record['grad_norm']:.3f}" if record.get("grad_norm") is not None else "grad-norm -",
                 f"{record['tokens_per_s']:.0f} tok/s", f"{record['tflops']:.2f} TFLOP/s"]
        if record.get("mfu") is not None:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        parts.append(f"mem {record['mem_gib']:.2f} GiB")
        parts.append(f"{_clock(elapsed)} elapsed, ETA {_clock(eta)}")
        print("[finetune] " + " | ".join(parts), flush=True)
        if sys.stdout.isatty():
            width = 30
            filled = int(width * step / max(self.total, 1))
            print(f"  [{'#' * filled}{'.' * (width - filled)}] {100 * step / max(self.total, 1):.0f}%", flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
