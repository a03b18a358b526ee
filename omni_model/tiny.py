"""Build the embedded default: a tiny random-weight Qwen3-Omni with the real architecture and tokenizer.

`tiny_variant(text=..., vision=..., audio=...)` gives other small configs of the same architecture (other head
counts, expert counts, dense layers, tower sizes) for tests that must not depend on the default's particular shape.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import zlib

import torch

from .configs import tiny_config
from .tokenizer import write_preprocessor_configs, write_tokenizer

TINY_DTYPE = torch.bfloat16  # the released checkpoint is bf16 on disk; so is ours (fp32 math upcasts exactly)


def tiny_variant(text: Optional[dict] = None, vision: Optional[dict] = None, audio: Optional[dict] = None) -> dict:
    """The tiny config with thinker sub-config overrides; the sizes other parts depend on follow (the towers'
    output width and the talker's input width are the LLM hidden size; the talker reads an existing LLM layer)."""
    config = copy.deepcopy(tiny_config())
    thinker = config["thinker_config"]
    thinker["text_config"].update(text or {})
    thinker["vision_config"].update(vision or {})
    thinker["audio_config"].update(audio or {})
    hidden = thinker["text_config"]["hidden_size"]
    thinker["vision_config"]["out_hidden_size"] = hidden
    thinker["audio_config"]["output_dim"] = hidden
    talker = config["talker_config"]
    talker["thinker_hidden_size"] = hidden
    talker["accept_hidden_layer"] = min(talker["accept_hidden_layer"], thinker["text_config"]["num_hidden_layers"])
    return config


def build_tiny_model(seed: int = 0, config: Optional[dict] = None):
    """The full `Qwen3OmniMoeForConditionalGeneration` (thinker + talker + code2wav) with seeded random weights
    (`config`: a `config.json` dict, default the embedded tiny one)."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    config = Qwen3OmniMoeConfig(**(config or tiny_config()))
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


def write_tiny_checkpoint(out_dir: Path, seed: int = 0, config: Optional[dict] = None) -> Path:
    """Write an HF checkpoint dir (safetensors, config, tokenizer, chat template, preprocessor config).

    Deterministic: the same seed (and config) gives byte-identical files.
    """
    out_dir = Path(out_dir)
    model = build_tiny_model(seed, config)
    model.save_pretrained(out_dir, safe_serialization=True)
    write_tokenizer(out_dir)
    write_preprocessor_configs(out_dir)
    return out_dir


def tiny_codec_config(config: Optional[dict] = None) -> dict:
    """A toy-width Mimi with the real frame (24 kHz, encoder ratios [8, 6, 5, 4] + the stride-2 downsampling = 1920
    samples, 12.5 Hz) and exactly the code layout of the model's talker: ``num_code_groups`` quantizers (1 semantic
    + the rest acoustic) with codebooks of the talker's code range."""
    from .data.speech import TalkerCodes

    codes = TalkerCodes.from_config(config or tiny_config())
    return {"hidden_size": 32, "num_filters": 4, "num_residual_layers": 1, "codebook_dim": 8,
            "vector_quantization_hidden_dimension": 8, "upsample_groups": 32, "num_hidden_layers": 1,
            "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2,
            "num_quantizers": codes.num_code_groups, "codebook_size": codes.code_limit}


def write_tiny_codec(out_dir: Path, seed: int = 0, config: Optional[dict] = None) -> Path:
    """Write a seeded random Mimi codec folder (config.json + model.safetensors, fp32) for the model of `config`
    (default the tiny one). Deterministic: the same seed gives byte-identical files.

    Weights: seeded noise scaled by 1/sqrt(fan-in) (the 0.02-std init of the tiny model would make the latents
    nearly independent of the input, so every frame would get the same codes), norm scales 1 + noise; codebooks
    (the quantizers' ``embed_sum`` buffers, with a cluster usage of 1) seeded noise at the scale of the projected
    latents of a probe tone, so that speech gets varied codes in every group."""
    from transformers import MimiConfig, MimiModel

    model = MimiModel(MimiConfig(**tiny_codec_config(config))).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = _seeded_noise(seed, name, param.shape)
            fan_in = param[0].numel() if param.ndim >= 2 else 0
            is_scale = param.ndim == 1 and "norm" in name and name.endswith("weight")
            param.copy_(1.0 + 0.1 * noise if is_scale else noise / fan_in**0.5 if fan_in else 0.02 * noise)
        probe = torch.sin(torch.arange(48000) * (2 * torch.pi * 440 / 24000))[None, None] * 0.3
        latents = model.encoder(probe).latents
        scale = model.quantizer.semantic_residual_vector_quantizer.input_proj(latents).std()
        for name, buffer in model.named_buffers():
            if name.endswith("codebook.embed_sum"):
                buffer.copy_(_seeded_noise(seed, name, buffer.shape) * scale)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def _seeded_noise(seed: int, name: str, shape) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator, dtype=torch.float32)
