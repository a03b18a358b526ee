"""Build the embedded default: a tiny random-weight Qwen3-Omni with the real architecture and tokenizer."""

from __future__ import annotations

from pathlib import Path

import zlib

import torch

from .configs import tiny_config
from .tokenizer import write_preprocessor_configs, write_tokenizer

TINY_DTYPE = torch.bfloat16  # the released checkpoint is bf16 on disk; so is ours (fp32 math upcasts exactly)


def build_tiny_model(seed: int = 0):
    """The full `Qwen3OmniMoeForConditionalGeneration` (thinker + talker + code2wav) with seeded random weights."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    config = Qwen3OmniMoeConfig(**tiny_config())
    model = Qwen3OmniMoeForConditionalGeneration(config)
    _seeded_init(model, seed)
    return model.to(TINY_DTYPE).eval()


def _seeded_init(model: torch.nn.Module, seed: int) -> None:
    """Fill every parameter from a generator seeded by (seed, parameter name).

    transformers leaves some tensors (the talker's experts) as uninitialised memory, so its own init is not
    reproducible; this one is, and it is independent of module creation order. Norm scales get 1 + noise so that
    parity tests cannot pass with a norm weight ignored.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            is_scale = param.ndim == 1 and ("norm" in name or ".ln" in name) and name.endswith("weight")
            param.copy_(1.0 + 0.1 * noise if is_scale else 0.02 * noise)


def write_tiny_checkpoint(out_dir: Path, seed: int = 0) -> Path:
    """Write an HF checkpoint dir (safetensors, config, tokenizer, chat template, preprocessor config).

    Deterministic: the same seed gives byte-identical files.
    """
    out_dir = Path(out_dir)
    model = build_tiny_model(seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    write_tokenizer(out_dir)
    write_preprocessor_configs(out_dir)
    return out_dir
