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
