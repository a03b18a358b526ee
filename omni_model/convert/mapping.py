"""HF <-> Megatron-Core parameter mapping driven by ONE declarative table of `Rule` rows.

Tables: `llm_rules.LLM_RULES` (thinker LLM) + `encoder_rows.ENCODER_RULES` (vision/audio, when that module exists).
Everything name- or layout-related is derived from the rows; this module only knows the transforms and the
parallel layout arithmetic:

- `{i}` layer placeholder. Rows whose mcore side is `language_model.decoder.layers.{i}.` are pipeline-split:
  HF global layer i lives on stage i // (L/pp) as local layer i % (L/pp) (uniform stages). The LLM embedding is on
  the first stage, final norm + output layer on the last; all other rows (encoders) on the first stage.
- `{e}` expert placeholder: HF global expert e lives on EP rank e // (E/ep) as local expert e % (E/ep); expert rows
  are split over the expert-TP group (etp) instead of TP.
- `tp_dim`: the dim of the mcore tensor split over TP (contiguous chunks, mcore's Column/RowParallel layout), with
  the transform deciding what "the full tensor" means (`qkv`: per-group [q_g..., k_g, v_g] interleave, so that TP
  chunks hold whole groups; `gate_up`: each TP shard is [gate_shard; up_shard]).

API (streaming, tensor by tensor; tensors keep their dtype, so HF -> mcore -> HF is bit-exact):

    coord = RankCoord(tp_rank=.., pp_rank=.., ep_rank=.., etp_rank=..)   # runtime.parallel.rank_coords()
    sd = hf_to_mcore_rank(reader.get, reader.keys(), config, layout, coord)   # {mcore_key: tensor} of this rank
    for hf_key, tensor in mcore_to_hf(rank_state_dicts, config, layout): ...   # {coord: {mcore_key: tensor}}
    load_hf_into_model(model, hf_dir)        # the running rank's model (coords from parallel_state)
    export_model_to_hf(models_by_coord, ...) # see mcore_to_hf

`config` is the HF config (full `config.json` dict / thinker / dir). `layout` is model.transformer_config.Layout.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from ..model.transformer_config import Layout, text_config_of, thinker_config_of
from .llm_rules import LLM_RULES, MC
from .rules import Rule

LLM_LAYER_PREFIX = MC + "decoder.layers.{i}."


def default_rules(config=None, tp: int = 1) -> List[Rule]:
    """LLM rows + the encoder rows for this TP size (the audio rows are replicated where the audio tower is,
    e.g. the released 20-head tower at TP=8; see encoder_rows.encoder_rules_for)."""
    from .encoder_rows import ENCODER_RULES, encoder_rules_for

    _register_encoder_transforms()
    has_audio = config is not None and "audio_config" in thinker_config_of(config)
    encoder = encoder_rules_for(config, tp) if has_audio and tp > 1 else ENCODER_RULES
    return list(LLM_RULES) + list(encoder)


def _register_encoder_transforms() -> None:
    """Adopt encoder_rows.ENCODER_TRANSFORMS ({name: (to_mcore(tensors, heads), to_hf(tensor, heads))}, full
    tensors) as TP-aware transforms: TP split/concat of the full mcore tensor along the row's tp_dim."""
    try:
        from .encoder_rows import ENCODER_TRANSFORMS
    except ImportError:
        return
    for name, (to_m, to_h) in ENCODER_TRANSFORMS.items():
        if name not in TRANSFORMS:
            TRANSFORMS[name] = FullTensorTransform(to_m, to_h)


# ------------------------------------------------------------------------------------------------------------------
# transforms
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    num_heads: int
    num_groups: int
    head_dim: int


class Transform:
    """to_mcore(hf tensors, geometry, tp_rank, tp_size, tp_dim) -> this TP rank's mcore tensor;
    to_hf(list of TP shards in rank order, geometry, tp_dim) -> tuple of HF tensors (rule.hf order)."""

    def to_mcore(self, hf: Sequence[torch.Tensor], g: Optional[Geometry], r: int, n: int, dim) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, shards: Sequence[torch.Tensor], g: Optional[Geometry], dim) -> Tuple[torch.Tensor, ...]:
        raise NotImplementedError


def _chunk(t, n, r, dim):
    if dim is None or n == 1:
        return t
    assert t.shape[dim] % n == 0, f"dim {dim} of {tuple(t.shape)} not divisible by {n}"
    return t.chunk(n, dim=dim)[r].clone()


def _cat(shards, dim):
    if dim is None or len(shards) == 1:
        return shards[0]
    return torch.cat(list(shards), dim=dim)


class Identity(Transform):
    def to_mcore(self, hf, g, r, n, dim):
        (t,) = hf
        return _chunk(t, n, r, dim)

    def to_hf(self, shards, g, dim):
        if dim is None:  # replicated: every shard must agree; take the first
            return (shards[0],)
        return (_cat(shards, dim),)


class QKV(Transform):
    """q [nh*hd, ...], k [ng*hd, ...], v [ng*hd, ...] -> mcore linear_qkv rows: per query group g,
    [q heads of g (nh/ng of them), k_g, v_g]; TP splits whole groups (dim 0)."""

    def _fuse(self, q, k, v, g: Geometry):
        per = g.num_heads // g.num_groups
        rest = q.shape[1:]
        q = q.reshape(g.num_groups, per * g.head_dim, *rest)
        k = k.reshape(g.num_groups, g.head_dim, *rest)
        v = v.reshape(g.num_groups, g.head_dim, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def _split(self, fused, g: Geometry):
        per = g.num_heads // g.num_groups
        rest = fused.shape[1:]
        x = fused.reshape(g.num_groups, (per + 2) * g.head_dim, *rest)
        q, k, v = x.split([per * g.head_dim, g.head_dim, g.head_dim], dim=1)
        return (
            q.reshape(-1, *rest).clone(),
            k.reshape(-1, *rest).clone(),
            v.reshape(-1, *rest).clone(),
        )

    def to_mcore(self, hf, g, r, n, dim):
        assert dim in (0, None)
        return _chunk(self._fuse(*hf, g), n, r, 0 if dim is not None else None)

    def to_hf(self, shards, g, dim):
        return self._split(_cat(shards, 0 if dim is not None else None), g)


class QKVFused(QKV):
    """One HF tensor [q; k; v] (e.g. a ViT `attn.qkv`) -> mcore per-group interleave (like QKV)."""

    def to_mcore(self, hf, g, r, n, dim):
        (t,) = hf
        sizes = [g.num_heads * g.head_dim, g.num_groups * g.head_dim, g.num_groups * g.head_dim]
        return super().to_mcore(t.split(sizes, dim=0), g, r, n, dim)

    def to_hf(self, shards, g, dim):
        return (torch.cat(super().to_hf(shards, g, dim), dim=0),)


class GateUp(Transform):
    """gate [F, H], up [F, H] -> fc1 [2F, H]; TP shard r = [gate chunk r; up chunk r] (mcore SwiGLU layout)."""

    def to_mcore(self, hf, g, r, n, dim):
        gate, up = hf
        d = 0 if dim is not None else None
        return torch.cat([_chunk(gate, n, r, d), _chunk(up, n, r, d)], dim=0)

    def to_hf(self, shards, g, dim):
        gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
        return (_cat(gates, 0).clone(), _cat(ups, 0).clone())


class FullTensorTransform(Transform):
    """Adapter for a pair of full-tensor functions taking the head count (`Geometry.num_heads`)."""

    def __init__(self, to_m, to_h):
        self.to_m, self.to_h = to_m, to_h

    def to_mcore(self, hf, g, r, n, dim):
        return _chunk(self.to_m(list(hf), g.num_heads), n, r, dim)

    def to_hf(self, shards, g, dim):
        return tuple(self.to_h(_cat(shards, dim), g.num_heads))


TRANSFORMS: Dict[str, Transform] = {
    "identity": Identity(),
    "qkv": QKV(),
    "qkv_fused": QKVFused(),
    "gate_up": GateUp(),
}


def register_transform(name: str, transform: Transform) -> None:
    TRANSFORMS[name] = transform


def attention_geometry(hf_key: str, config) -> Optional[Geometry]:
    """Head geometry of the attention a HF key belongs to (LLM / vision tower / audio tower)."""
    th = thinker_config_of(config) if not _is_text_only(config) else {"text_config": text_config_of(config)}
    if hf_key.startswith("thinker.visual."):
        v = th["vision_config"]
        nh = v["num_heads"]
        return Geometry(nh, nh, v["hidden_size"] // nh)
    if hf_key.startswith("thinker.audio_tower."):
        a = th["audio_config"]
        nh = a["encoder_attention_heads"]
        return Geometry(nh, nh, a["d_model"] // nh)
    t = th["text_config"]
    nh = t["num_attention_heads"]
    return Geometry(nh, t.get("num_key_value_heads", nh), t.get("head_dim") or t["hidden_size"] // nh)


def _is_text_only(config) -> bool:
    return isinstance(config, dict) and "thinker_config" not in config and "text_config" not in config


# ------------------------------------------------------------------------------------------------------------------
# pattern matching + layout arithmetic
# ------------------------------------------------------------------------------------------------------------------
def _compile(pattern: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(i|e)\}", pattern):
        out += re.escape(pattern[pos : m.start()]) + rf"(?P<{m.group(1)}>\d+)"
        pos = m.end()
    return re.compile("^" + out + re.escape(pattern[pos:]) + "$")


def _fill(pattern: str, i=None, e=None) -> str:
    s = pattern
    if i is not None:
        s = s.replace("{i}", str(i))
    if e is not None:
        s = s.replace("{e}", str(e))
    return s


@dataclass(frozen=True)
class RankCoord:
    tp_rank: int = 0
    pp_rank: int = 0
    ep_rank: int = 0
    etp_rank: int = 0


class _Row:
    def __init__(self, rule: Rule):
        self.rule = rule
        self.hf_re = [_compile(p) for p in rule.hf]
        self.mc_re = _compile(rule.mcore)
        self.transform = TRANSFORMS[rule.transform]
        self.is_expert = "{e}" in rule.mcore
        self.is_llm_layer = rule.mcore.startswith(LLM_LAYER_PREFIX)
        m = rule.mcore
        self.stage = (
            "layer"
            if self.is_llm_layer
            else "last"
            if m in (MC + "decoder.final_layernorm.weight", MC + "output_layer.weight")
            else "first"
        )


class Mapper:
    def __init__(self, config, layout: Optional[Layout] = None, rules: Optional[Iterable[Rule]] = None):
        self.config = config
        self.layout = layout or Layout()
        rules = default_rules(config, self.layout.tp) if rules is None else rules
        _register_encoder_transforms()
        self.rows = [_Row(r) for r in rules]
        t = text_config_of(config)
        self.num_layers = t["num_hidden_layers"]
        self.num_experts = t.get("num_experts", 0) or 0
        lo = self.layout
        assert self.num_layers % lo.pp == 0, "uniform pipeline stages only"
        self.layers_per_stage = self.num_layers // lo.pp
        if self.num_experts:
            assert self.num_experts % lo.ep == 0
            self.local_experts = self.num_experts // lo.ep
        self._geo_cache: Dict[str, Optional[Geometry]] = {}

    def _geometry(self, hf_key):
        prefix = hf_key.split(".")[1] if hf_key.startswith("thinker.") else ""
        if prefix not in self._geo_cache:
            try:
                self._geo_cache[prefix] = attention_geometry(hf_key, self.config)
            except (KeyError, TypeError):
                self._geo_cache[prefix] = None
        return self._geo_cache[prefix]

    # --- which rank holds what -------------------------------------------------------------------------------------
    def _pp_of(self, row: _Row, i) -> Tuple[int, Optional[int]]:
        """(pp stage, mcore-side layer index) of an HF binding."""
        if row.stage == "layer":
            return int(i) // self.layers_per_stage, int(i) % self.layers_per_stage
        if row.stage == "last":
            return self.layout.pp - 1, i
        return 0, i

    def _tp(self, row: _Row, coord: RankCoord) -> Tuple[int, int]:
        if row.is_expert:
            return coord.etp_rank, self.layout.etp
        return coord.tp_rank, self.layout.tp

    # --- HF -> mcore -----------------------------------------------------------------------------------------------
    def iter_hf_to_mcore_rank(
        self, get_hf: Callable[[str], torch.Tensor], hf_keys: Iterable[str], coord: RankCoord
    ) -> Iterator[Tuple[str, torch.Tensor]]:
        for key in hf_keys:
            for row in self.rows:
                m = row.hf_re[0].match(key)
                if not m:
                    continue
                gd = m.groupdict()
                i, e = gd.get("i"), gd.get("e")
                stage, local_i = self._pp_of(row, i)
                if stage != coord.pp_rank:
                    break
                local_e = None
                if e is not None:
                    e = int(e)
                    if e // self.local_experts != coord.ep_rank:
                        break
                    local_e = e % self.local_experts
                tensors = [get_hf(_fill(p, i, e)) for p in row.rule.hf]
                r, n = self._tp(row, coord)
                out = row.transform.to_mcore(tensors, self._geometry(key), r, n, row.rule.tp_dim)
                yield _fill(row.rule.mcore, local_i, local_e), out
                break

    def hf_to_mcore_rank(self, get_hf, hf_keys, coord: RankCoord) -> Dict[str, torch.Tensor]:
        return dict(self.iter_hf_to_mcore_rank(get_hf, hf_keys, coord))

    def unmapped_hf_keys(self, hf_keys: Iterable[str], prefixes=("thinker.",)) -> List[str]:
        """HF keys under `prefixes` that no row covers (first or later pattern of a row)."""
        res = []
        for k in hf_keys:
            if not k.startswith(tuple(prefixes)):
                continue
            if not any(p.match(k) for row in self.rows for p in row.hf_re):
                res.append(k)
        return res

    # --- mcore -> HF -----------------------------------------------------------------------------------------------
    def iter_mcore_to_hf(
        self, rank_state_dicts: Mapping[RankCoord, Mapping[str, torch.Tensor]]
    ) -> Iterator[Tuple[str, torch.Tensor]]:
        """`rank_state_dicts`: one (lazy) state dict per rank coordinate, enough coordinates to cover every shard:
        for dense rows every (pp, tp), for expert rows every (pp, ep, etp). Non-parameter keys (`_extra_state`) are
        ignored. Yields HF tensors one by one."""
        by = {}
        for c in rank_state_dicts:
            by.setdefault(c.pp_rank, []).append(c)
        done = set()
        for pp, coords in sorted(by.items()):
            for c in coords:
                for key in list(rank_state_dicts[c].keys()):
                    for row in self.rows:
                        m = row.mc_re.match(key)
                        if not m:
                            continue
                        gd = m.groupdict()
                        li, le = gd.get("i"), gd.get("e")
                        # global indices
                        if row.stage == "layer":
                            gi = pp * self.layers_per_stage + int(li)
                        else:
                            gi = li
                        ge = c.ep_rank * self.local_experts + int(le) if le is not None else None
                        ident = (row.rule.mcore, gi, ge)
                        if ident in done:
                            break
                        done.add(ident)
                        shards = self._gather(rank_state_dicts, by[pp], row, key, c)
                        hf = row.transform.to_hf(shards, self._geometry(_fill(row.rule.hf[0], gi, ge)), row.rule.tp_dim)
                        for pat, t in zip(row.rule.hf, hf):
                            yield _fill(pat, gi, ge), t
                        break

    def _gather(self, sds, coords, row: _Row, key, c0: RankCoord) -> List[torch.Tensor]:
        n = self.layout.etp if row.is_expert else self.layout.tp
        if row.rule.tp_dim is None and row.rule.transform == "identity":
            return [sds[c0][key]]
        shards = []
        for r in range(n):
            found = None
            for c in coords:
                if row.is_expert:
                    ok = c.ep_rank == c0.ep_rank and c.etp_rank == r
                else:
                    ok = c.tp_rank == r
                if ok and key in sds[c]:
                    found = sds[c][key]
                    break
            assert found is not None, f"no shard {r}/{n} of {key}"
            shards.append(found)
        return shards


# ------------------------------------------------------------------------------------------------------------------
# functional API
# ------------------------------------------------------------------------------------------------------------------
def hf_to_mcore_rank(get_hf, hf_keys, config, layout: Layout, coord: RankCoord, rules=None) -> Dict[str, torch.Tensor]:
    return Mapper(config, layout, rules).hf_to_mcore_rank(get_hf, hf_keys, coord)


def mcore_to_hf(rank_state_dicts, config, layout: Layout, rules=None) -> Iterator[Tuple[str, torch.Tensor]]:
    return Mapper(config, layout, rules).iter_mcore_to_hf(rank_state_dicts)


def all_coords(layout: Layout) -> List[RankCoord]:
    """Every distinct shard coordinate of a layout (for offline conversion and round-trip tests)."""
    return [
        RankCoord(t, p, e, x)
        for p in range(layout.pp)
        for t in range(layout.tp)
        for e in range(layout.ep)
        for x in range(layout.etp)
    ]


class SafetensorsReader:
    """Tensor-by-tensor reader of an HF checkpoint dir (single file or sharded with an index)."""

    def __init__(self, hf_dir):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        idx = self.dir / "model.safetensors.index.json"
        if idx.exists():
            wm = json.loads(idx.read_text())["weight_map"]
            files = sorted(set(wm.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        self._handles = {f: safe_open(str(self.dir / f), "pt") for f in files}
        self._where = {k: f for f, h in self._handles.items() for k in h.keys()}
        self.config = json.loads((self.dir / "config.json").read_text())

    def keys(self) -> List[str]:
        return list(self._where)

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str = MC) -> Dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def add_prefix(sd: Mapping[str, torch.Tensor], prefix: str = MC) -> Dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def current_coord() -> RankCoord:
    from ..runtime.parallel import rank_coords

    return RankCoord(**rank_coords())


def load_hf_into_model(model: torch.nn.Module, hf, *, layout: Optional[Layout] = None, coord: Optional[RankCoord] = None,
                       prefix: str = MC, rules=None) -> None:
    """Load this rank's shard of an HF checkpoint (dir or SafetensorsReader) into `model` (the standalone LLM:
    prefix 'language_model.' is stripped; pass prefix='' for a module whose names carry the full thinker names).
    Every parameter must be filled (only `_extra_state` may be missing); dtype is cast to the parameter's."""
    from ..model.language_model import current_layout

    reader = hf if isinstance(hf, SafetensorsReader) else SafetensorsReader(hf)
    layout = layout or current_layout()
    coord = coord or current_coord()
    rules = rules if rules is not None else (LLM_RULES if prefix == MC else None)
    sd = Mapper(reader.config, layout, rules).hf_to_mcore_rank(reader.get, reader.keys(), coord)
    sd = strip_prefix(sd, prefix) if prefix else sd
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("_extra_state")]
    unexpected = [k for k in sd if k not in own]
    assert not missing and not unexpected, f"missing {missing[:5]} unexpected {unexpected[:5]}"
    with torch.no_grad():
        for k, v in sd.items():
            assert own[k].shape == v.shape, f"{k}: model {tuple(own[k].shape)} vs mapped {tuple(v.shape)}"
            own[k].copy_(v.to(own[k].dtype))


def model_state_for_export(model: torch.nn.Module, prefix: str = MC) -> Dict[str, torch.Tensor]:
    """This rank's parameters under mapping names (drop `_extra_state`), for `mcore_to_hf`."""
    return {prefix + k: v.detach() for k, v in model.state_dict().items() if not k.endswith("_extra_state") and v is not None}
