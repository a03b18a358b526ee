"""HF <-> Megatron-Core rows for the two encoder towers of the Qwen3-Omni thinker.

`ENCODER_RULES` (local-spec names, audio tower tensor-parallel) is the table the mapping framework consumes. HF keys
are the on-disk names (`thinker.visual.*`, `thinker.audio_tower.*`); mcore keys are the state-dict names of
`omni_model.model.vision.VisionEncoder` under `vision_model.` and of `omni_model.model.audio.AudioEncoder` under
`audio_model.`. `{i}` is a layer index (ViT block / AuT layer) or, in the deepstack rows, the deepstack merger index;
it matches `\\d+` in both patterns.

Transforms introduced here (pure functions, both directions; the framework should register `ENCODER_TRANSFORMS`
next to its own "identity"/"qkv"/...):

* ``"vit_qkv"``: one HF tensor `attn.qkv.{weight,bias}` laid out [q(all heads); k(all heads); v(all heads)]
  -> mcore `linear_qkv` laid out per head [q_h; k_h; v_h] for h in heads (num_query_groups == num_heads).
* ``"aut_qkv"``: three HF tensors `self_attn.{q,k,v}_proj.{weight,bias}` -> the same mcore per-head layout.

Both need the number of attention heads: call them as `fn(tensors, heads)`; `transform_heads(rule, config)` gives
`heads` for a row from the HF config (vision: `num_heads`, audio: `encoder_attention_heads`). For TP the mcore
tensor is then split evenly along `tp_dim` (the per-head layout makes a contiguous dim-0 split a split by heads).

`encoder_rules(te=True)` gives the names of the TransformerEngine layer spec (LayerNorms fused into the following
linear: `linear_qkv.layer_norm_{weight,bias}`, `mlp.linear_fc1.layer_norm_{weight,bias}`);
`encoder_rules(audio_tp=False)` marks every audio row replicated (tower built with `replicate=True`, needed when
TP does not divide the 20 audio heads, e.g. TP=8).

`hf_to_mcore` / `mcore_to_hf` below apply the rows to whole state dicts (used by the encoder tests; the framework
may use them or its own streaming loop).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, Optional

import torch

from .rules import Rule

VISION_HF = "thinker.visual."
VISION_MCORE = "vision_model."
AUDIO_HF = "thinker.audio_tower."
AUDIO_MCORE = "audio_model."


# ---------------------------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------------------------


def _per_head(stacked: torch.Tensor, heads: int) -> torch.Tensor:
    """[3, heads*hd, ...] -> [heads*3*hd, ...] grouped per head."""
    three, rows = stacked.shape[:2]
    rest = stacked.shape[2:]
    hd = rows // heads
    return stacked.reshape(3, heads, hd, *rest).transpose(0, 1).reshape(3 * rows, *rest)


def _from_per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """inverse of `_per_head`: -> [3, heads*hd, ...]."""
    rows = t.shape[0] // 3
    rest = t.shape[1:]
    hd = rows // heads
    return t.reshape(heads, 3, hd, *rest).transpose(0, 1).reshape(3, rows, *rest)


def vit_qkv_to_mcore(tensors, heads: int) -> torch.Tensor:
    (fused,) = tensors
    return _per_head(fused.reshape(3, fused.shape[0] // 3, *fused.shape[1:]), heads)


def vit_qkv_to_hf(t: torch.Tensor, heads: int) -> list[torch.Tensor]:
    q_k_v = _from_per_head(t, heads)
    return [q_k_v.reshape(t.shape)]


def aut_qkv_to_mcore(tensors, heads: int) -> torch.Tensor:
    q, k, v = tensors
    return _per_head(torch.stack([q, k, v]), heads)


def aut_qkv_to_hf(t: torch.Tensor, heads: int) -> list[torch.Tensor]:
    q, k, v = _from_per_head(t, heads).unbind(0)
    return [q.contiguous(), k.contiguous(), v.contiguous()]


# name -> (hf tensors -> mcore tensor, mcore tensor -> hf tensors); both take `heads` as second argument
ENCODER_TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "vit_qkv": (vit_qkv_to_mcore, vit_qkv_to_hf),
    "aut_qkv": (aut_qkv_to_mcore, aut_qkv_to_hf),
}


def _sub(config, key: str) -> dict:
    from omni_model.model.encoder_layers import sub_config

    return sub_config(config, key)


def transform_heads(rule: Rule, config) -> int:
    """Attention heads an encoder transform needs, from the HF config (top-level, thinker or component dict)."""
    if rule.transform == "vit_qkv":
        return int(_sub(config, "vision_config")["num_heads"])
    if rule.transform == "aut_qkv":
        return int(_sub(config, "audio_config")["encoder_attention_heads"])
    raise KeyError(rule.transform)


# ---------------------------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------------------------


def _r(hf, mcore, transform="identity", tp_dim=None) -> Rule:
    return Rule(hf=hf if isinstance(hf, tuple) else (hf,), mcore=mcore, transform=transform, tp_dim=tp_dim)


def _linear(hf_prefix: str, mcore_prefix: str, kind: str, tp: bool) -> list[Rule]:
    """weight+bias of a column ("col") or row ("row") parallel linear."""
    if kind == "col":
        dims = (0, 0)
    else:
        dims = (1, None)
    if not tp:
        dims = (None, None)
    return [
        _r(hf_prefix + "weight", mcore_prefix + "weight", tp_dim=dims[0]),
        _r(hf_prefix + "bias", mcore_prefix + "bias", tp_dim=dims[1]),
    ]


def _norm(hf_prefix: str, mcore_prefix: str) -> list[Rule]:
    return [_r(hf_prefix + "weight", mcore_prefix + "weight"), _r(hf_prefix + "bias", mcore_prefix + "bias")]


def _layer_norm_names(te: bool) -> tuple[str, str]:
    if te:
        return "self_attention.linear_qkv.layer_norm_", "mlp.linear_fc1.layer_norm_"
    return "input_layernorm.", "pre_mlp_layernorm."


def vision_rules(te: bool = False) -> list[Rule]:
    H, M = VISION_HF, VISION_MCORE
    ln1, ln2 = _layer_norm_names(te)
    blk, lay = H + "blocks.{i}.", M + "decoder.layers.{i}."
    rows = [
        _r(H + "patch_embed.proj.weight", M + "patch_embed.proj.weight"),
        _r(H + "patch_embed.proj.bias", M + "patch_embed.proj.bias"),
        _r(H + "pos_embed.weight", M + "pos_embed.weight"),
        *_norm(blk + "norm1.", lay + ln1),
        _r(blk + "attn.qkv.weight", lay + "self_attention.linear_qkv.weight", "vit_qkv", 0),
        _r(blk + "attn.qkv.bias", lay + "self_attention.linear_qkv.bias", "vit_qkv", 0),
        *_linear(blk + "attn.proj.", lay + "self_attention.linear_proj.", "row", True),
        *_norm(blk + "norm2.", lay + ln2),
        *_linear(blk + "mlp.linear_fc1.", lay + "mlp.linear_fc1.", "col", True),
        *_linear(blk + "mlp.linear_fc2.", lay + "mlp.linear_fc2.", "row", True),
    ]
    for hf_m, mc_m in ((H + "merger.", M + "merger."), (H + "merger_list.{i}.", M + "deepstack_mergers.{i}.")):
        rows += [
            *_norm(hf_m + "ln_q.", mc_m + "ln_q."),
            *_linear(hf_m + "mlp.0.", mc_m + "linear_fc1.", "col", True),
            *_linear(hf_m + "mlp.2.", mc_m + "linear_fc2.", "row", True),
        ]
    return rows


def audio_rules(te: bool = False, tp: bool = True) -> list[Rule]:
    H, M = AUDIO_HF, AUDIO_MCORE
    ln1, ln2 = _layer_norm_names(te)
    lyr, lay = H + "layers.{i}.", M + "decoder.layers.{i}."
    qkv_dim = 0 if tp else None
    rows = []
    for conv in ("conv2d1", "conv2d2", "conv2d3"):
        rows += [_r(H + conv + ".weight", M + conv + ".weight"), _r(H + conv + ".bias", M + conv + ".bias")]
    rows += [
        _r(H + "conv_out.weight", M + "conv_out.weight"),
        *_norm(lyr + "self_attn_layer_norm.", lay + ln1),
        _r(tuple(lyr + f"self_attn.{p}_proj.weight" for p in "qkv"), lay + "self_attention.linear_qkv.weight",
           "aut_qkv", qkv_dim),
        _r(tuple(lyr + f"self_attn.{p}_proj.bias" for p in "qkv"), lay + "self_attention.linear_qkv.bias",
           "aut_qkv", qkv_dim),
        *_linear(lyr + "self_attn.out_proj.", lay + "self_attention.linear_proj.", "row", tp),
        *_norm(lyr + "final_layer_norm.", lay + ln2),
        *_linear(lyr + "fc1.", lay + "mlp.linear_fc1.", "col", tp),
        *_linear(lyr + "fc2.", lay + "mlp.linear_fc2.", "row", tp),
        *_norm(H + "ln_post.", M + "ln_post."),
        *_linear(H + "proj1.", M + "proj1.", "col", False),
        *_linear(H + "proj2.", M + "proj2.", "col", False),
    ]
    return rows


def encoder_rules(te: bool = False, audio_tp: bool = True) -> list[Rule]:
    return vision_rules(te) + audio_rules(te, audio_tp)


ENCODER_RULES: list[Rule] = encoder_rules()


def encoder_rules_for(config, tp: int, te: bool = False) -> list[Rule]:
    """The rows for a TP size: like ENCODER_RULES, but the audio rows replicated when the audio tower is
    (`omni_model.model.audio.audio_replicated`, e.g. the released 20-head tower at TP=8). Use this instead of
    ENCODER_RULES whenever TP > 1."""
    from omni_model.model.audio import audio_replicated

    return encoder_rules(te=te, audio_tp=not audio_replicated(config, tp))


# ---------------------------------------------------------------------------------------------------------------
# applying rows to whole state dicts
# ---------------------------------------------------------------------------------------------------------------


def _regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


def expand_rules(rules: Iterable[Rule], hf_keys: Iterable[str]) -> list[tuple[Rule, tuple[str, ...], str]]:
    """Concrete (rule, hf keys, mcore key) for every index present among `hf_keys`."""
    hf_keys = set(hf_keys)
    out = []
    for rule in rules:
        rx = _regex(rule.hf[0])
        seen = set()
        for key in sorted(hf_keys):
            m = rx.match(key)
            if not m:
                continue
            i = m.groupdict().get("i")
            if i in seen:
                continue
            seen.add(i)
            fill = (lambda p: p.replace("{i}", i)) if i is not None else (lambda p: p)
            out.append((rule, tuple(fill(p) for p in rule.hf), fill(rule.mcore)))
    return out


def tp_shard(t: torch.Tensor, tp_dim: Optional[int], tp_rank: int, tp_size: int) -> torch.Tensor:
    if tp_dim is None or tp_size == 1:
        return t
    return t.chunk(tp_size, dim=tp_dim)[tp_rank].contiguous()


def hf_to_mcore(hf: Mapping[str, torch.Tensor], config, rules: Iterable[Rule] = ENCODER_RULES,
                tp_rank: int = 0, tp_size: int = 1) -> dict[str, torch.Tensor]:
    """mcore state dict (this TP rank's shards) of every rule whose HF tensors are in `hf`."""
    out = {}
    for rule, hf_names, mcore_name in expand_rules(rules, hf.keys()):
        tensors = [hf[n] for n in hf_names]
        if rule.transform == "identity":
            (t,) = tensors
        else:
            t = ENCODER_TRANSFORMS[rule.transform][0](tensors, transform_heads(rule, config))
        out[mcore_name] = tp_shard(t, rule.tp_dim, tp_rank, tp_size)
    return out


def mcore_to_hf(mcore: Mapping[str, torch.Tensor], config, rules: Iterable[Rule] = ENCODER_RULES
                ) -> dict[str, torch.Tensor]:
    """HF tensors from a full (TP-gathered) mcore state dict."""
    rules = list(rules)
    out = {}
    for rule in rules:
        rx = _regex(rule.mcore)
        for key, t in mcore.items():
            m = rx.match(key)
            if not m:
                continue
            i = m.groupdict().get("i")
            names = [p.replace("{i}", i) if i is not None else p for p in rule.hf]
            if rule.transform == "identity":
                tensors = [t]
            else:
                tensors = ENCODER_TRANSFORMS[rule.transform][1](t, transform_heads(rule, config))
            out.update(zip(names, tensors))
    return out


def load_encoder_state(module: torch.nn.Module, hf: Mapping[str, torch.Tensor], config, mcore_prefix: str,
                       rules: Iterable[Rule] = ENCODER_RULES, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Copy HF tensors into one tower (`mcore_prefix` = "vision_model." or "audio_model."), strictly: every
    parameter of the module must be filled, every row for this tower must find its parameter."""
    sd = {k[len(mcore_prefix):]: v for k, v in hf_to_mcore(hf, config, rules, tp_rank, tp_size).items()
          if k.startswith(mcore_prefix)}
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(sd))
    unknown = sorted(set(sd) - set(params))
    if missing or unknown:
        raise KeyError(f"encoder load: unfilled parameters {missing[:8]}, unmapped rows {unknown[:8]}")
    with torch.no_grad():
        for name, p in params.items():
            src = sd[name]
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(f"{name}: mapped shape {tuple(src.shape)} != parameter {tuple(p.shape)}")
            p.copy_(src.to(p.dtype))
