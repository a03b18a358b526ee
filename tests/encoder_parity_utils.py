"""Shared helpers of the encoder parity tests (vision + audio, single process and the torchrun TP worker)."""

from __future__ import annotations

import glob
from pathlib import Path

import torch

VISION_HF = "thinker.visual."
AUDIO_HF = "thinker.audio_tower."


def load_hf_encoder_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 copies of every `thinker.visual.*` / `thinker.audio_tower.*` tensor of a checkpoint dir."""
    from safetensors import safe_open

    out = {}
    for f in sorted(glob.glob(str(Path(hf_dir) / "*.safetensors"))):
        with safe_open(f, "pt") as s:
            for k in s.keys():
                if k.startswith(VISION_HF) or k.startswith(AUDIO_HF):
                    out[k] = s.get_tensor(k).float()
    return out


def sharpen(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rescale the tiny checkpoint's 0.02-std weights to ~1.5/sqrt(fan_in) (pos-embed to std 1, biases x5) so that
    activations are O(1), attention is peaked and every path (rope, segments, windows) visibly moves the output.
    With the raw tiny weights the towers are nearly input-independent and parity would prove little."""
    out = {}
    for k, v in hf.items():
        if k.endswith("pos_embed.weight"):
            v = v / v.std()
        elif v.ndim >= 2:
            v = v / v.std() * v[0].numel() ** -0.5 * 1.5
        elif k.endswith("bias"):
            v = v * 5
        out[k] = v
    return out


def _hf_tower(hf_dir: Path, tensors: dict[str, torch.Tensor], sub_config: str, class_name: str, prefix: str):
    """transformers' tower `class_name` (sdpa, fp32) holding the tensors under `prefix`."""
    from transformers import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe

    cfg = getattr(Qwen3OmniMoeConfig.from_pretrained(hf_dir).thinker_config, sub_config)
    cfg._attn_implementation = "sdpa"
    ref = getattr(modeling_qwen3_omni_moe, class_name)(cfg).float().eval()
    ref.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    return ref


def hf_vision_reference(hf_dir: Path, tensors: dict[str, torch.Tensor]):
    return _hf_tower(hf_dir, tensors, "vision_config", "Qwen3OmniMoeVisionEncoder", VISION_HF)


def hf_audio_reference(hf_dir: Path, tensors: dict[str, torch.Tensor]):
    return _hf_tower(hf_dir, tensors, "audio_config", "Qwen3OmniMoeAudioEncoder", AUDIO_HF)


def hf_config_dict(hf_dir: Path) -> dict:
    import json

    return json.loads((Path(hf_dir) / "config.json").read_text())


def vision_inputs(grid: list[list[int]], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grid_thw = torch.tensor(grid)
    n = int(grid_thw.prod(-1).sum())
    return torch.randn(n, 3 * 2 * 16 * 16, generator=g), grid_thw


def audio_inputs(lens: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(128, sum(lens), generator=g), torch.tensor(lens)


def tower_mapper(cfg, tp_size: int = 1, audio_tp: bool = True):
    """The production mapping engine for the towers at TP `tp_size` (audio rows replicated when not `audio_tp`)."""
    from omni_model.convert.encoder_rows import encoder_rules
    from omni_model.convert.llm_rules import LLM_RULES
    from omni_model.convert.mapping import Mapper
    from omni_model.model.transformer_config import Layout

    rules = None if audio_tp else list(LLM_RULES) + encoder_rules(audio_tp=False)
    return Mapper(cfg, Layout(tp=tp_size), rules=rules)


def load_tower(module: torch.nn.Module, tensors: dict, cfg, mcore_prefix: str, tp_rank: int = 0, tp_size: int = 1,
               audio_tp: bool = True) -> None:
    """Copy HF tensors into one tower through the production `Mapper` (strict: every parameter filled)."""
    from omni_model.convert.mapping import RankCoord, copy_into_model

    hf_prefix = VISION_HF if mcore_prefix == "vision_model." else AUDIO_HF
    keys = [k for k in tensors if k.startswith(hf_prefix)]
    copy_into_model(module, tower_mapper(cfg, tp_size, audio_tp), tensors.__getitem__, keys,
                    RankCoord(tp_rank=tp_rank), prefix=mcore_prefix)


def hf_grads_as_mcore(ref: torch.nn.Module, hf_prefix: str, config, tp_rank: int = 0, tp_size: int = 1,
                      audio_tp: bool = True):
    """HF parameter gradients mapped through the rows (same transform/TP split as the weights)."""
    from omni_model.convert.mapping import RankCoord

    grads = {hf_prefix + n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    return tower_mapper(config, tp_size, audio_tp).hf_to_mcore_rank(grads.__getitem__, grads, RankCoord(tp_rank=tp_rank))


def assert_rows_round_trip(model: torch.nn.Module, mcore_prefix: str, hf_prefix: str, hf_weights: dict, cfg) -> None:
    """mcore state dict -> HF through the Mapper reproduces every HF tensor of the tower bit for bit."""
    from omni_model.convert.mapping import RankCoord

    state = {mcore_prefix + k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    back = dict(tower_mapper(cfg).iter_mcore_to_hf({RankCoord(): state}))
    expected = {k: v for k, v in hf_weights.items() if k.startswith(hf_prefix)}
    assert set(back) == set(expected)
    for key, value in expected.items():
        assert torch.equal(back[key], value), key
