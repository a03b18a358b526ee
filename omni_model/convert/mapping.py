"""HF <-> Megatron-Core parameter mapping: ONE engine (`Mapper`) driven by ONE declarative table of `Rule` rows.

Tables: `llm_rules.LLM_RULES` (thinker LLM) + `encoder_rows.encoder_rules(...)` (vision / audio towers, names of
the local or TE spec from the same `use_te` the model was built with). Everything name-related is derived from the
rows; this module knows the transforms and where a tensor lives in a parallel layout:

- `{i}` layer placeholder. LLM layer rows (`language_model.decoder.layers.{i}.`) are pipeline-split where mcore
  puts the layers: `get_transformer_layer_offset` / `get_num_layers_to_build` of the model's TransformerConfig
  (so uneven first/last stages, `pipeline_model_parallel_layout` and virtual stages follow mcore, not arithmetic).
  The embedding is on the first stage, final norm + output layer on the last; encoder rows on the first stage.
- `{e}` expert placeholder: HF global expert e lives on EP rank e // (E/ep) as local expert e % (E/ep); expert rows
  are split over the expert-TP group (etp) instead of TP.
- `tp_dim`: the dim of the mcore tensor split over TP (contiguous chunks, mcore's Column/RowParallel layout), with
  the transform deciding what "the full tensor" means (`qkv`: per-group [q_g..., k_g, v_g] interleave, so that TP
  chunks hold whole groups; `gate_up`: each TP shard is [gate_shard; up_shard]).

API (streaming, tensor by tensor; tensors keep their dtype, so HF -> mcore -> HF is bit-exact):

    mapper = Mapper(hf_config, layout, use_te=False)
    for binding in mapper.plan(reader.keys(), coord):           # what this rank needs, nothing else
        tensor = mapper.materialise(binding, reader.get, coord)  # one mcore tensor (this rank's shard)
    load_hf_into_model(model, hf_dir, prefix="")                 # copy each mapped tensor into its parameter
    for hf_key, tensor in mapper.iter_mcore_to_hf({coord: state_dict, ...}): ...   # export direction

`config` is the HF config (full `config.json` dict / thinker / dir). `layout` is model.transformer_config.Layout.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from ..configs import code_predictor_config_of, talker_text_config_of
from ..model.transformer_config import Layout, text_config_of, thinker_config_of
from .llm_rules import LLM_RULES, MC
from .rules import Rule
from .talker_rules import DECODER_LAYER as TALKER_LAYER_PREFIX
from .talker_rules import MC as TALKER_MC
from .talker_rules import TALKER_RULES

LLM_LAYER_PREFIX = MC + "decoder.layers.{i}."
# rows placed layer by layer over the pipeline stages (by the Mapper's TransformerConfig: the thinker LLM's, or the
# talker decoder's for a talker Mapper); every other row lives on the first stage, or the last (LAST_STAGE_ROWS)
LAYER_PREFIXES = (LLM_LAYER_PREFIX, TALKER_LAYER_PREFIX)
LAST_STAGE_ROWS = (MC + "decoder.final_layernorm.weight", MC + "output_layer.weight",
                   TALKER_MC + "language_model.decoder.final_layernorm.weight",
                   TALKER_MC + "language_model.output_layer.weight")


class MappingError(ValueError):
    """A checkpoint does not fit the mapping table: a tensor missing, unclaimed, or of the wrong shape / dtype."""


def thinker_rules(config, tp: int = 1, use_te: bool = False) -> List[Rule]:
    """LLM rows + encoder rows for this TP size and spec (audio rows replicated where the audio tower is)."""
    from .encoder_rows import encoder_rules_for

    return list(LLM_RULES) + encoder_rules_for(config, tp, te=use_te)


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
    if t.shape[dim] % n:
        raise MappingError(f"dim {dim} of {tuple(t.shape)} not divisible by {n} ranks")
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
    [q heads of g (nh/ng of them), k_g, v_g]; TP splits whole groups (dim 0). The encoders' full MHA is the case
    ng == nh (per head [q_h; k_h; v_h])."""

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
        return tuple(t.reshape(-1, *rest).clone() for t in (q, k, v))

    def to_mcore(self, hf, g, r, n, dim):
        return _chunk(self._fuse(*hf, g), n, r, 0 if dim is not None else None)

    def to_hf(self, shards, g, dim):
        return self._split(_cat(shards, 0 if dim is not None else None), g)


class QKVFused(QKV):
    """One HF tensor [q; k; v] (the ViT's `attn.qkv`) -> mcore per-group interleave (like QKV)."""

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


TRANSFORMS: Dict[str, Transform] = {
    "identity": Identity(),
    "qkv": QKV(),
    "qkv_fused": QKVFused(),
    "gate_up": GateUp(),
}


def attention_geometry(hf_key: str, config) -> Optional[Geometry]:
    """Head geometry of the attention a HF key belongs to (LLM / vision tower / audio tower / talker decoder /
    code predictor)."""
    if hf_key.startswith("talker."):
        t = code_predictor_config_of(config) if hf_key.startswith("talker.code_predictor.") \
            else talker_text_config_of(config)
        nh = t["num_attention_heads"]
        return Geometry(nh, t.get("num_key_value_heads", nh), t.get("head_dim") or t["hidden_size"] // nh)
    thinker = thinker_config_of(config)
    if hf_key.startswith("thinker.visual."):
        v = thinker["vision_config"]
        nh = v["num_heads"]
        return Geometry(nh, nh, v["hidden_size"] // nh)
    if hf_key.startswith("thinker.audio_tower."):
        a = thinker["audio_config"]
        nh = a["encoder_attention_heads"]
        return Geometry(nh, nh, a["d_model"] // nh)
    t = text_config_of(config)
    nh = t["num_attention_heads"]
    return Geometry(nh, t.get("num_key_value_heads", nh), t.get("head_dim") or t["hidden_size"] // nh)


# ------------------------------------------------------------------------------------------------------------------
# pattern matching + placement
# ------------------------------------------------------------------------------------------------------------------
def expert_count(hf_pattern: str, config) -> int:
    """Routed experts of the MoE a HF key (pattern) belongs to: the talker decoder's or the thinker LLM's."""
    text = talker_text_config_of(config) if hf_pattern.startswith("talker.") else text_config_of(config)
    return text.get("num_experts", 0) or 0


def _part(hf_key: str) -> str:
    """The model part of a HF key (`thinker.visual`, `talker.code_predictor`, ...): one attention geometry each."""
    head = hf_key.split(".", 2)
    return ".".join(head[:2]) if head[0] in ("thinker", "talker") else head[0]


def _compile(pattern: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(i|e)\}", pattern):
        out += re.escape(pattern[pos : m.start()]) + rf"(?P<{m.group(1)}>\d+)"
        pos = m.end()
    return re.compile("^" + out + re.escape(pattern[pos:]) + "$")


def _fill(pattern: str, i=None, e=None) -> str:
    if i is not None:
        pattern = pattern.replace("{i}", str(i))
    if e is not None:
        pattern = pattern.replace("{e}", str(e))
    return pattern


@dataclass(frozen=True)
class RankCoord:
    tp_rank: int = 0
    pp_rank: int = 0
    ep_rank: int = 0
    etp_rank: int = 0
    vp_stage: Optional[int] = None  # model chunk of a virtual pipeline stage (None: no virtual pipeline)


class _Row:
    def __init__(self, rule: Rule):
        self.rule = rule
        self.hf_re = [_compile(p) for p in rule.hf]
        self.mc_re = _compile(rule.mcore)
        self.transform = TRANSFORMS[rule.transform]
        self.is_expert = "{e}" in rule.mcore
        self.stage = ("layer" if rule.mcore.startswith(LAYER_PREFIXES)
                      else "last" if rule.mcore in LAST_STAGE_ROWS else "first")


@dataclass(frozen=True)
class Binding:
    """One mcore tensor of one rank: the row, the HF tensors it is made of, its (stage-local) mcore name."""

    row: _Row
    hf_keys: Tuple[str, ...]
    mcore_key: str


def layer_placement(tconfig) -> Dict[int, Tuple[int, Optional[int], int]]:
    """Global LLM layer -> (pp rank, vp stage, stage-local index), from mcore's own layer-offset helpers."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    vpp = tconfig.virtual_pipeline_model_parallel_size
    out = {}
    for pp in range(tconfig.pipeline_model_parallel_size):
        for vp in (range(vpp) if vpp else [None]):
            offset = get_transformer_layer_offset(tconfig, vp_stage=vp, pp_rank=pp)
            for local in range(get_num_layers_to_build(tconfig, vp_stage=vp, pp_rank=pp)):
                out[offset + local] = (pp, vp, local)
    return out


class Mapper:
    """The mapping engine. `tconfig`: the LLM's mcore TransformerConfig (default: built from the HF config and
    the layout); layer placement comes from it. The talker's Mapper: `talker_mapper(...)` (its rows, its decoder's
    TransformerConfig)."""

    def __init__(self, config, layout: Optional[Layout] = None, *, use_te: bool = False,
                 rules: Optional[Iterable[Rule]] = None, tconfig=None):
        self.config = config
        self.layout = layout or Layout()
        rules = thinker_rules(config, self.layout.tp, use_te) if rules is None else rules
        self.rows = [_Row(r) for r in rules]
        if tconfig is None:
            from ..model.transformer_config import build_transformer_config

            tconfig = build_transformer_config(config, self.layout, perform_initialization=False)
        self.placement = layer_placement(tconfig)
        self.global_layer = {(pp, vp, local): i for i, (pp, vp, local) in self.placement.items()}
        for row in self.rows:
            if row.is_expert:
                experts = expert_count(row.rule.hf[0], config)
                if experts % self.layout.ep:
                    raise MappingError(f"{experts} experts do not split over ep={self.layout.ep}")
                row.local_experts = experts // self.layout.ep
        self._geometry_cache: Dict[str, Optional[Geometry]] = {}

    def _geometry(self, hf_key):
        part = _part(hf_key)
        if part not in self._geometry_cache:
            try:
                self._geometry_cache[part] = attention_geometry(hf_key, self.config)
            except (KeyError, TypeError):
                self._geometry_cache[part] = None
        return self._geometry_cache[part]

    # --- which rank holds what -------------------------------------------------------------------------------------
    def _local_layer(self, row: _Row, i, coord: RankCoord) -> Tuple[bool, Optional[int]]:
        """(does `coord` hold this binding, its mcore-side layer index)."""
        if row.stage == "layer":
            pp, vp, local = self.placement[int(i)]
            return (pp, vp) == (coord.pp_rank, coord.vp_stage), local
        last_pp = self.layout.pp - 1
        if row.stage == "last":
            return coord.pp_rank == last_pp and coord.vp_stage in (None, self._last_vp()), i
        return coord.pp_rank == 0 and coord.vp_stage in (None, 0), i

    def _last_vp(self):
        vps = [vp for (pp, vp, _) in self.global_layer if pp == self.layout.pp - 1]
        return max(vps) if vps and vps[0] is not None else None

    def _tp(self, row: _Row, coord: RankCoord) -> Tuple[int, int]:
        if row.is_expert:
            return coord.etp_rank, self.layout.etp
        return coord.tp_rank, self.layout.tp

    def _match(self, key: str):
        """(row, match) of the row whose FIRST HF pattern matches `key`, else None."""
        for row in self.rows:
            m = row.hf_re[0].match(key)
            if m:
                return row, m
        return None

    # --- HF -> mcore -----------------------------------------------------------------------------------------------
    def plan(self, hf_keys: Iterable[str], coord: RankCoord) -> List[Binding]:
        """The mcore tensors of `coord` that the HF keys make (names only, nothing is read)."""
        out = []
        for key in hf_keys:
            found = self._match(key)
            if found is None:
                continue
            row, m = found
            gd = m.groupdict()
            i, e = gd.get("i"), gd.get("e")
            here, local_i = self._local_layer(row, i, coord)
            if not here:
                continue
            local_e = None
            if e is not None:
                e = int(e)
                if e // row.local_experts != coord.ep_rank:
                    continue
                local_e = e % row.local_experts
            out.append(Binding(row, tuple(_fill(p, i, e) for p in row.rule.hf), _fill(row.rule.mcore, local_i, local_e)))
        return out

    def materialise(self, binding: Binding, get_hf: Callable[[str], torch.Tensor], coord: RankCoord) -> torch.Tensor:
        """This rank's mcore tensor of a binding (reads its HF tensors through `get_hf`)."""
        tensors = []
        for key in binding.hf_keys:
            try:
                tensors.append(get_hf(key))
            except KeyError:
                raise MappingError(f"expected tensor {key} (needed for {binding.mcore_key}) is missing from the "
                                   f"checkpoint") from None
        r, n = self._tp(binding.row, coord)
        try:
            return binding.row.transform.to_mcore(tensors, self._geometry(binding.hf_keys[0]), r, n,
                                                  binding.row.rule.tp_dim)
        except (RuntimeError, MappingError) as error:
            shapes = ", ".join(f"{k} {tuple(t.shape)}" for k, t in zip(binding.hf_keys, tensors))
            raise MappingError(f"cannot map {shapes} to {binding.mcore_key}: {error}") from None

    def iter_hf_to_mcore_rank(self, get_hf, hf_keys, coord: RankCoord) -> Iterator[Tuple[str, torch.Tensor]]:
        for binding in self.plan(hf_keys, coord):
            yield binding.mcore_key, self.materialise(binding, get_hf, coord)

    def hf_to_mcore_rank(self, get_hf, hf_keys, coord: RankCoord) -> Dict[str, torch.Tensor]:
        return dict(self.iter_hf_to_mcore_rank(get_hf, hf_keys, coord))

    def unmapped_hf_keys(self, hf_keys: Iterable[str], prefixes=("thinker.",)) -> List[str]:
        """HF keys under `prefixes` that no row claims (first or later pattern of a row)."""
        return [k for k in hf_keys if k.startswith(tuple(prefixes))
                and not any(p.match(k) for row in self.rows for p in row.hf_re)]

    def hf_keys_of(self, mcore_key: str, coord: RankCoord) -> List[str]:
        """The HF tensors an mcore tensor of `coord` is made of (for error messages)."""
        for row in self.rows:
            m = row.mc_re.match(mcore_key)
            if m:
                i, e = self._global_indices(row, m, coord)
                return [_fill(p, i, e) for p in row.rule.hf]
        return []

    def _global_indices(self, row: _Row, m: re.Match, coord: RankCoord):
        gd = m.groupdict()
        li, le = gd.get("i"), gd.get("e")
        gi = self.global_layer[(coord.pp_rank, coord.vp_stage, int(li))] if row.stage == "layer" else li
        ge = coord.ep_rank * row.local_experts + int(le) if le is not None else None
        return gi, ge

    # --- mcore -> HF -----------------------------------------------------------------------------------------------
    def iter_mcore_to_hf(
        self, rank_state_dicts: Mapping[RankCoord, Mapping[str, torch.Tensor]]
    ) -> Iterator[Tuple[str, torch.Tensor]]:
        """`rank_state_dicts`: one (lazy) state dict per rank coordinate, enough coordinates to cover every shard:
        for dense rows every (pp, tp), for expert rows every (pp, ep, etp). Non-parameter keys (`_extra_state`) are
        ignored. Yields HF tensors one by one."""
        stages: Dict[Tuple[int, Optional[int]], List[RankCoord]] = {}
        for c in rank_state_dicts:
            stages.setdefault((c.pp_rank, c.vp_stage), []).append(c)
        done = set()
        for stage, coords in sorted(stages.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            for c in coords:
                for key in list(rank_state_dicts[c].keys()):
                    for row in self.rows:
                        m = row.mc_re.match(key)
                        if not m:
                            continue
                        gi, ge = self._global_indices(row, m, c)
                        ident = (row.rule.mcore, gi, ge)
                        if ident not in done:
                            done.add(ident)
                            shards = self._gather(rank_state_dicts, coords, row, key, c)
                            geometry = self._geometry(_fill(row.rule.hf[0], gi, ge))
                            for pattern, t in zip(row.rule.hf, row.transform.to_hf(shards, geometry, row.rule.tp_dim)):
                                yield _fill(pattern, gi, ge), t
                        break

    def _gather(self, sds, coords, row: _Row, key, c0: RankCoord) -> List[torch.Tensor]:
        n = self.layout.etp if row.is_expert else self.layout.tp
        if row.rule.tp_dim is None and row.rule.transform == "identity":
            return [sds[c0][key]]
        shards = []
        for r in range(n):
            found = None
            for c in coords:
                ok = (c.ep_rank == c0.ep_rank and c.etp_rank == r) if row.is_expert else c.tp_rank == r
                if ok and key in sds[c]:
                    found = sds[c][key]
                    break
            if found is None:
                raise MappingError(f"no shard {r}/{n} of {key}")
            shards.append(found)
        return shards


def talker_mapper(config, layout: Optional[Layout] = None, *, use_te: bool = False) -> Mapper:
    """The Mapper of the talker (TALKER_RULES; layer placement from the talker decoder's TransformerConfig)."""
    from ..model.talker import talker_transformer_configs

    layout = layout or Layout()
    decoder, _, _ = talker_transformer_configs(config, layout, perform_initialization=False)
    return Mapper(config, layout, use_te=use_te, rules=TALKER_RULES, tconfig=decoder)


def load_hf_into_talker(talker: torch.nn.Module, hf, *, layout: Optional[Layout] = None,
                        coord: Optional[RankCoord] = None) -> int:
    """Load this rank's shard of the talker tensors of an HF checkpoint (dir or SafetensorsReader) into a
    model.talker.Qwen3OmniTalker (strict, like copy_into_model). Returns the tensors copied."""
    from ..model.language_model import current_layout

    reader = hf if isinstance(hf, SafetensorsReader) else SafetensorsReader(hf)
    mapper = talker_mapper(reader.config, layout or current_layout())
    return copy_into_model(talker, mapper, reader.get, reader.keys(), coord or current_coord(), prefix=TALKER_MC)


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
    """Tensor-by-tensor reader of an HF checkpoint dir (single file or sharded with an index). `get` reads one
    tensor from the memory-mapped file; nothing else is held (but the touched pages of the map: see `release`)."""

    def __init__(self, hf_dir):
        self.dir = Path(hf_dir)
        idx = self.dir / "model.safetensors.index.json"
        if idx.exists():
            files = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise MappingError(f"{self.dir} holds no *.safetensors files")
        self._files = files
        self.release()
        self._where = {k: f for f, h in self._handles.items() for k in h.keys()}
        self.config = json.loads((self.dir / "config.json").read_text())

    def release(self) -> None:
        """Drop the files' memory maps (and open them afresh): a tensor `get` returns lives in its file's map, and the
        pages it touched stay in this process's RSS while the map does, even after the tensor is freed. A caller
        that reads a whole checkpoint in parts (convert's save groups) releases after each, so its memory is one
        part's, not the checkpoint's."""
        from safetensors import safe_open

        self._handles = {}  # the old handles (and their maps) go first
        self._handles = {f: safe_open(str(self.dir / f), "pt") for f in self._files}

    def keys(self) -> List[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise KeyError(key)
        return self._handles[self._where[key]].get_tensor(key)

    def shape(self, key: str) -> tuple:
        """A tensor's shape, from the header (nothing is read)."""
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def numel(self, key: str) -> int:
        n = 1
        for d in self.shape(key):
            n *= d
        return n

    def nbytes(self, key: str) -> int:
        return self.numel(key) * _DTYPE_BYTES[self.dtype(key)]

    def dtype(self, key: str) -> str:
        """The safetensors dtype name of a tensor ("BF16", "F32", ...), from the header."""
        return self._handles[self._where[key]].get_slice(key).get_dtype()


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def current_coord() -> RankCoord:
    from ..runtime.parallel import rank_coords

    return RankCoord(**rank_coords())


def copy_into_model(model: torch.nn.Module, mapper: Mapper, get_hf: Callable[[str], torch.Tensor],
                    hf_keys: Iterable[str], coord: RankCoord, *, prefix: str = "",
                    progress: Optional[Callable[[Binding], None]] = None,
                    select: Optional[Callable[[str], bool]] = None) -> int:
    """Copy, don't collect: map the HF tensors of `coord` one at a time straight into `model`'s parameters (cast to
    the parameter's dtype) and free each before the next. `prefix` is dropped from the mcore names (e.g.
    'language_model.' for the standalone LLM, 'vision_model.' for one tower). `select(name)`: only the model
    tensors it accepts are filled and checked (convert fills one save group at a time; the rest stay on meta).
    Strict: every (selected) parameter is filled (only `_extra_state` may stay), every mapped tensor has a parameter
    of its shape. Returns the tensors copied."""
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    if select is not None:
        everything, own = own, {k: v for k, v in own.items() if select(k)}
    filled = set()
    with torch.no_grad():
        for binding in mapper.plan(hf_keys, coord):
            if not binding.mcore_key.startswith(prefix):
                continue
            name = binding.mcore_key[len(prefix):]
            if select is not None and name in everything and name not in own:
                continue  # another group's tensor: not read now
            if name not in own:
                raise MappingError(f"{binding.hf_keys} map to {binding.mcore_key}, which the model does not have")
            tensor = mapper.materialise(binding, get_hf, coord)
            target = own[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise MappingError(f"{', '.join(binding.hf_keys)} -> {binding.mcore_key}: mapped shape "
                                   f"{tuple(tensor.shape)} != model shape {tuple(target.shape)}")
            target.copy_(tensor)
            filled.add(name)
            del tensor
            if progress is not None:
                progress(binding)
    missing = [k for k in own if k not in filled]
    if missing:
        expected = [", ".join(mapper.hf_keys_of(prefix + k, coord)) or "(no row)" for k in missing[:5]]
        raise MappingError(f"{len(missing)} model tensors not filled, e.g. {missing[:5]}; expected HF tensors "
                           f"missing from the checkpoint: {expected}")
    return len(filled)


def load_hf_into_model(model: torch.nn.Module, hf, *, layout: Optional[Layout] = None,
                       coord: Optional[RankCoord] = None, prefix: str = MC, rules=None, use_te: bool = False) -> None:
    """Load this rank's shard of an HF checkpoint (dir or SafetensorsReader) into `model` (the standalone LLM:
    prefix 'language_model.' is stripped; pass prefix='' for the thinker, whose names carry the full names)."""
    from ..model.language_model import current_layout

    reader = hf if isinstance(hf, SafetensorsReader) else SafetensorsReader(hf)
    layout = layout or current_layout()
    coord = coord or current_coord()
    rules = rules if rules is not None else (LLM_RULES if prefix == MC else None)
    mapper = Mapper(reader.config, layout, use_te=use_te, rules=rules, tconfig=_llm_config_of(model))
    copy_into_model(model, mapper, reader.get, reader.keys(), coord, prefix=prefix)


def _llm_config_of(model: torch.nn.Module):
    """The LLM TransformerConfig of a thinker or standalone LLM (layer placement follows it); None otherwise."""
    from ..model.language_model import Qwen3OmniLanguageModel

    lm = getattr(model, "language_model", model)
    return lm.config if isinstance(lm, Qwen3OmniLanguageModel) else None
