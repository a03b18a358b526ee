"""Shared helpers of the LLM tests (also imported by the torchrun scripts in tests/dist/)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def text_batch(vocab: int = 151600, b: int = 2, s: int = 12, seed: int = 0):
    """Token ids [B, S] and non-trivial MRoPE position ids [3, B, S] (T/H/W differ, so the interleave is tested)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    base = torch.arange(s).view(1, 1, s).expand(3, b, s).clone()
    base[1] = base[1] * 2 + 3  # H axis
    base[2] = base[2] // 2 + 7  # W axis
    return ids, base


def hf_thinker(hf_dir, dtype=torch.float32):
    from transformers import Qwen3OmniMoeForConditionalGeneration

    m = Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(hf_dir), dtype=dtype).thinker
    # transformers 5.24 defaults MoE experts to its `grouped_mm` path, which on CPU gave run-to-run different
    # logits here (0.27-0.44 abs between two processes, same weights/inputs). The eager per-expert loop is the
    # reference: use it.
    for mod in m.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_experts_implementation"):
            cfg._experts_implementation = "eager"
    return m.eval()


def hf_text_logits(thinker, ids, pos, deepstack=None, visual_mask=None):
    """Logits [B, S, V] of HF's thinker LLM (embeddings -> text model -> lm_head) with explicit MRoPE ids."""
    lm = thinker.model.language_model if hasattr(thinker.model, "language_model") else thinker.model
    with torch.no_grad():
        emb = lm.embed_tokens(ids)
        out = lm(
            inputs_embeds=emb,
            position_ids=pos,
            visual_pos_masks=visual_mask,
            deepstack_visual_embeds=deepstack,
        )
        return thinker.lm_head(out.last_hidden_state)


def config_of(hf_dir) -> dict:
    return json.loads((Path(hf_dir) / "config.json").read_text())


def deepstack_inputs(shape, hidden: int, n: int, seed: int = 1):
    """A visual-position mask [B, S] (a block of positions per sample) and n deepstack features [N_visual, H]."""
    b, s = shape
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, s, dtype=torch.bool)
    mask[0, 2:6] = True
    if b > 1:
        mask[1, 5:8] = True
    nv = int(mask.sum())
    return mask, [torch.randn(nv, hidden, generator=g) for _ in range(n)]


def tiny_language_model(hf_dir):
    """The tiny checkpoint's LLM (local spec, fp32) in a private single-process group, weights loaded."""
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.language_model import build_language_model
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    m = build_language_model(config_of(hf_dir), dtype=torch.float32, use_te=False)
    load_hf_into_model(m, hf_dir)
    return m


def packed_text_row(lengths, seed: int = 0):
    """One THD row of len(lengths) text sequences: ids [1, T], MRoPE positions [3, 1, T] restarting per sequence,
    and the THD PackedSeqParams."""
    from megatron.core.packed_seq_params import PackedSeqParams

    parts = [text_batch(b=1, s=n, seed=seed + i) for i, n in enumerate(lengths)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                          max_seqlen_kv=max(lengths))
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 2), psp


def on_device_of(m, ids, pos, psp):
    """A packed row on the model's device (the builder puts the model on the GPU where there is one)."""
    import dataclasses

    device = next(m.parameters()).device
    cu = psp.cu_seqlens_q.to(device)
    return ids.to(device), pos.to(device), dataclasses.replace(psp, cu_seqlens_q=cu, cu_seqlens_kv=cu)


def sharpened_checkpoint(hf_dir, out_dir, parts=("thinker.",)) -> Path:
    """A copy of an HF checkpoint dir whose weights under `parts` (default the thinker's) are `sharpen()`-ed (O(1)
    activations, peaked attention and routing): with the tiny checkpoint's 0.02-std weights the model is nearly
    input-independent and a parity test would prove little. Other files and tensors are copied as they are."""
    import shutil

    from safetensors.torch import load_file, save_file

    from encoder_parity_utils import sharpen

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in Path(hf_dir).iterdir():
        if path.suffix != ".safetensors":
            shutil.copy2(path, out_dir / path.name) if path.is_file() else shutil.copytree(path, out_dir / path.name)
            continue
        tensors = load_file(str(path))
        chosen = {k: v.float() for k, v in tensors.items() if k.startswith(tuple(parts))}
        sharp = {k: v.to(tensors[k].dtype).contiguous() for k, v in sharpen(chosen).items()}
        save_file({**tensors, **sharp}, str(out_dir / path.name), metadata={"format": "pt"})
    return out_dir



def sharp_fp32_thinker(hf_dir, out_dir):
    """The whole thinker (towers included) in fp32 on this rank, eval mode, with `sharpened_checkpoint` weights."""
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.thinker import build_thinker
    from omni_model.runtime.parallel import init_parallel

    sharp = sharpened_checkpoint(hf_dir, out_dir)
    init_parallel()
    model = build_thinker(sharp, dtype=torch.float32).eval()
    load_hf_into_model(model, sharp, prefix="")
    return model

def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|."""
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
