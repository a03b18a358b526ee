"""The same random weights in ours and in transformers' thinker, drawn where they are used (no checkpoint on disk).

bench/train_throughput.py runs each model in its own process; for the first-step loss of the two to be comparable
(same data, same weights -> same loss) both draw every tensor of the thinker from one generator seeded by
(seed, on-disk tensor name), the draw of omni_model.random_checkpoint.random_tensor (N(0, 0.02) weights, 1 + N(0, 0.1)
norm scales, rounded to bf16) made on the model's device. On the CPU the values are exactly random_tensor's, so a
checkpoint that write_random_checkpoint writes with the same seed holds the same bytes (tests/test_bench_train_smoke.py
loads it with transformers' own from_pretrained and compares).

- ours: the on-disk tensors go through the conversion's own mapping table (omni_model.convert.mapping.Mapper,
  copy_into_model), as `convert` would map them from a checkpoint;
- transformers: each in-memory parameter's on-disk names come from transformers' revert_weight_conversion (what
  save_pretrained uses) on a meta copy; the fused experts are assembled as its loading conversion fuses them
  (gate_up_proj[e] = [gate_proj of expert e; up_proj of expert e], down_proj[e] = down_proj of expert e).
"""

from __future__ import annotations

import re
import zlib

import torch

DTYPE = torch.bfloat16
EXPERT = re.compile(r"\.experts\.(\d+)\.(\w+)\.weight$")
# a fused in-memory expert tensor -> the per-expert on-disk parts, concatenated in this order along dim 0
FUSED_EXPERT_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def seeded_tensor(name: str, shape: tuple, seed: int, device="cpu") -> torch.Tensor:
    """random_checkpoint.random_tensor's value of `name`, drawn on `device` (the same bytes on the CPU)."""
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32, device=device)
    is_scale = len(shape) == 1 and ("norm" in name or ".ln" in name) and name.endswith("weight")
    return (1.0 + 0.1 * noise if is_scale else 0.02 * noise).to(DTYPE)


def thinker_disk_shapes(config: dict) -> dict:
    """{on-disk name: shape} of the thinker's tensors (`thinker.*`) for a full Qwen3-Omni config.json dict."""
    from omni_model.random_checkpoint import on_disk_tensors

    return {name: shape for name, shape in on_disk_tensors(config).items() if name.startswith("thinker.")}


def fill_ours(thinker: torch.nn.Module, config: dict, seed: int) -> int:
    """Every parameter of our (unwrapped) thinker from the seeded on-disk tensors through the conversion table.
    Returns the tensors copied (copy_into_model is strict: a parameter left unfilled raises)."""
    from omni_model.convert.mapping import Mapper, _llm_config_of, copy_into_model, current_coord
    from omni_model.model.language_model import current_layout

    shapes = thinker_disk_shapes(config)
    device = next(thinker.parameters()).device
    mapper = Mapper(config, current_layout(), tconfig=_llm_config_of(thinker))
    return copy_into_model(thinker, mapper, lambda name: seeded_tensor(name, shapes[name], seed, device),
                           shapes, current_coord(), prefix="")


def disk_names(model: torch.nn.Module, name: str, param: torch.Tensor) -> list:
    """The on-disk names (`thinker.` + what save_pretrained writes) of one in-memory parameter of transformers'
    thinker."""
    from transformers.core_model_loading import revert_weight_conversion

    reverted = revert_weight_conversion(model, {name: torch.empty_like(param, device="meta")})
    return ["thinker." + key for key in reverted]


def hf_value(name: str, parts: list, shapes: dict, seed: int, device) -> torch.Tensor:
    """The in-memory value of transformers' parameter `name` from its on-disk parts."""
    if len(parts) == 1 and not EXPERT.search(parts[0]):
        return seeded_tensor(parts[0], shapes[parts[0]], seed, device)
    fused = name.rsplit(".", 1)[-1]
    by_expert: dict = {}
    for part in parts:
        match = EXPERT.search(part)
        if match is None or fused not in FUSED_EXPERT_PARTS:
            raise ValueError(f"{name}: unexpected on-disk parts {parts[:3]}")
        by_expert.setdefault(int(match.group(1)), {})[match.group(2)] = part
    experts = []
    for e in sorted(by_expert):
        names = [by_expert[e][kind] for kind in FUSED_EXPERT_PARTS[fused]]
        experts.append(torch.cat([seeded_tensor(n, shapes[n], seed, device) for n in names], dim=0))
    return torch.stack(experts)


def fill_hf(model: torch.nn.Module, config: dict, seed: int) -> int:
    """Every parameter of transformers' thinker from the seeded on-disk tensors. Returns the parameters filled."""
    shapes = thinker_disk_shapes(config)
    used, filled = set(), 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            parts = disk_names(model, name, param)
            missing = [p for p in parts if p not in shapes]
            if missing:
                raise ValueError(f"{name}: on-disk names {missing[:3]} are not in the checkpoint's tensors")
            value = hf_value(name, parts, shapes, seed, param.device)
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{name}: assembled {tuple(value.shape)} != parameter {tuple(param.shape)}")
            param.copy_(value)
            used.update(parts)
            filled += 1
    unused = sorted(set(shapes) - used)
    if unused:
        raise ValueError(f"{len(unused)} thinker tensors fill no parameter, e.g. {unused[:3]}")
    return filled
