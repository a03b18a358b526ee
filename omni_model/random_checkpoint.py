"""`model.source: random`: a random-weight Qwen3-Omni HF checkpoint of any size, written tensor by tensor.

    write_random_checkpoint(out_dir, "released-30b-a3b", overrides={"thinker_config": {"text_config":
                            {"num_hidden_layers": 4}}}, seed=0)

Every tensor of the full model (thinker + talker + code2wav) gets the on-disk name, shape and dtype (bf16) that
transformers' `save_pretrained` writes: the names and shapes come from the transformers model built on the meta device
(no memory) and passed through `revert_weight_conversion`, the same step save_pretrained uses to turn its fused
in-memory experts back into per-expert tensors. Values are drawn per tensor from a generator seeded by
(seed, tensor name), so the same seed gives the same bytes whatever the shard size. The shards are written by the
export stage's writer (omni_model.safetensors_writer.ShardedSafetensorsWriter, the one way shards are written): headers
first (all shapes are known), then one tensor at a time, so a full 30B checkpoint never needs more host memory than
its largest tensor. Tokenizer, chat template and preprocessor files are the real ones
(omni_model.tokenizer).
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Union

import torch

DTYPE = torch.bfloat16
SAFETENSORS_DTYPE = "BF16"  # DTYPE as safetensors names it
DEFAULT_SHARD_BYTES = 4 * 1024**3


def merge(base: dict, overrides: Optional[dict]) -> dict:
    """`base` with `overrides` merged in recursively (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve_config(config: Union[str, Path, dict], overrides: Optional[dict] = None) -> dict:
    """'released-30b-a3b' (the released Qwen3-Omni-30B-A3B values), a config.json path, or a dict; + overrides."""
    from .configs import released_30b_a3b_config

    if isinstance(config, dict):
        base = config
    elif str(config) == "released-30b-a3b":
        base = released_30b_a3b_config()
    else:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"model.config {config!r}: neither 'released-30b-a3b' nor a config.json file")
        base = json.loads(path.read_text())
    return merge(base, overrides)


def on_disk_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor that `save_pretrained` writes for this config (computed on the meta device)."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    with torch.device("meta"):
        model = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**config))
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    return {name: tuple(t.shape) for name, t in revert_weight_conversion(model, state).items()}


def generator_device() -> str:
    """Where the values are drawn: a GPU when there is one. One CPU core draws ~20 MB/s (the 70 GB of the released
    shapes would take an hour); a GPU draws them faster than they can be written. CPU (mt19937) and CUDA (Philox)
    generators give different values for one seed: a seed names the same bytes on machines of the same kind."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def random_tensor(name: str, shape: tuple, seed: int, device: str = "cpu") -> torch.Tensor:
    """Seeded by (seed, name): N(0, 0.02) weights, 1 + N(0, 0.1) norm scales (like omni_model.tiny); on the CPU."""
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32, device=device)
    is_scale = len(shape) == 1 and ("norm" in name or ".ln" in name) and name.endswith("weight")
    return (1.0 + 0.1 * noise if is_scale else 0.02 * noise).to(DTYPE).cpu()


def write_config_files(out_dir: Path, config: dict) -> None:
    """config.json + generation_config.json as save_pretrained writes them, tokenizer + processor files."""
    from transformers import GenerationConfig, Qwen3OmniMoeConfig

    from .tokenizer import write_preprocessor_configs, write_tokenizer

    hf_config = Qwen3OmniMoeConfig(**config)
    hf_config.dtype = DTYPE
    hf_config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(hf_config).save_pretrained(out_dir)
    write_tokenizer(out_dir)
    write_preprocessor_configs(out_dir)


def write_random_checkpoint(out_dir, config: Union[str, Path, dict] = "released-30b-a3b",
                            overrides: Optional[dict] = None, seed: int = 0, shard_bytes: int = DEFAULT_SHARD_BYTES,
                            log: Callable[[str], None] = print) -> Path:
    """Write the checkpoint into out_dir (created); returns out_dir."""
    from .safetensors_writer import ShardedSafetensorsWriter, TensorEntry

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = resolve_config(config, overrides)
    shapes = on_disk_tensors(config)
    device = generator_device()
    log(f"random checkpoint: values drawn on {device}")
    plan = [TensorEntry(name, SAFETENSORS_DTYPE, shape, file=None, begin=0, end=math.prod(shape) * DTYPE.itemsize)
            for name, shape in shapes.items()]  # planned only: no source file, the bytes are drawn below
    with ShardedSafetensorsWriter(out_dir, plan, shard_bytes) as writer:
        left, total = Counter(writer.weight_map.values()), 0
        for name in sorted(shapes, key=writer.weight_map.__getitem__):  # shard by shard, to log each as it is done
            writer.write(name, random_tensor(name, shapes[name], seed, device))
            filename = writer.weight_map[name]
            left[filename] -= 1
            total += math.prod(shapes[name]) * DTYPE.itemsize
            if not left[filename]:
                log(f"random checkpoint: {filename} done ({total / 1e9:.2f} GB so far)")
        writer.finish()
    write_config_files(out_dir, config)
    return out_dir
