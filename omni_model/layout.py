"""The parallel layout of a run: one type for the model builders, the mapping, the memory planner and the training
checks (no torch import: the Snakefile's config checks use it).

    layout = Layout.of(config["parallel"], world_size=8)     # dp derived from the world size
    layout.stage_layers(48)                                  # decoder layers per pipeline stage
    layout.split_overrides()                                 # the TransformerConfig fields of that split

`parallel.first_stage_layers` (null = mcore's even split) is the one decision about the pipeline split: finetune
(build.model_config_overrides), convert on several ranks (the CLI's --first-stage-layers) and the planner read it
from here; export loads in one process (pp 1), and the torch_dist checkpoints name layers by their global number, so
a checkpoint of any split loads there (and at any other split) unchanged. The deepstack visual features are added to the hidden states of the first
N decoder layers and come from the vision tower, which lives on the first pipeline stage, so those N layers must be
there too (`check_deepstack`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


class LayoutError(ValueError):
    """A layout that cannot be built; the message names the config key to change."""


@dataclass(frozen=True)
class Layout:
    """Parallel sizes of one run. etp None = 1 (mcore's default for experts is etp = tp; 1 is the usual choice for
    fine-grained MoE). Sequence parallel is on when tp > 1 (MoE needs it). dp: data-parallel replicas (what is left of
    the world size, `Layout.of`). distributed_optimizer: the GPU path (the planner shards Adam state over DP with it).
    first_stage_layers: decoder layers on pipeline stage 0, None = even split."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: Optional[int] = None
    cp: int = 1
    dp: int = 1
    sequence_parallel: Optional[bool] = None
    distributed_optimizer: bool = True
    first_stage_layers: Optional[int] = None

    def __post_init__(self):
        if self.etp is None:
            object.__setattr__(self, "etp", 1)
        if self.sequence_parallel is None:
            object.__setattr__(self, "sequence_parallel", self.tp > 1)

    @classmethod
    def of(cls, parallel: dict, world_size: int, distributed_optimizer: bool = True) -> "Layout":
        """The layout of a config's `parallel` section on `world_size` ranks (dp = world / (tp x pp x cp))."""
        p = {"tp": 1, "pp": 1, "ep": 1, "etp": 1, "cp": 1, **{k: v for k, v in parallel.items() if v is not None}}
        model_parallel = p["tp"] * p["pp"] * p["cp"]
        if world_size % model_parallel:
            raise LayoutError(
                f"{world_size} rank(s) (train.gpus_per_node or train.cpu_procs x train.nnodes) are not a multiple of "
                f"parallel.tp x pp x cp = {model_parallel}")
        return cls(tp=p["tp"], pp=p["pp"], ep=p["ep"], etp=p["etp"], cp=p["cp"], dp=world_size // model_parallel,
                   distributed_optimizer=distributed_optimizer, first_stage_layers=p.get("first_stage_layers"))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def expert_dp(self) -> int:
        """Ranks holding the same experts (mcore's expert-data-parallel group): world / (pp x ep x etp)."""
        return self.world_size // (self.pp * self.ep * self.etp)

    def describe(self) -> str:
        return (f"tp{self.tp} pp{self.pp} ep{self.ep} etp{self.etp}" + (f" cp{self.cp}" if self.cp > 1 else "")
                + f" dp{self.dp}"
                + (f" first-stage-layers {self.first_stage_layers}" if self.first_stage_layers else "")
                + (" distopt" if self.distributed_optimizer else ""))

    # -- pipeline split -----------------------------------------------------------------------------------------------
    def stage_layers(self, num_layers: int) -> list[int]:
        """Decoder layers per pipeline stage: first_stage_layers on stage 0 and the rest evenly over the others (what
        mcore builds from num_layers_in_first_pipeline_stage), else mcore's even split."""
        first = self.first_stage_layers
        if self.pp == 1:
            if first not in (None, num_layers):
                raise LayoutError(f"parallel.first_stage_layers = {first} needs parallel.pp > 1 (set it to null)")
            return [num_layers]
        if first is None:
            if num_layers % self.pp:
                raise LayoutError(f"parallel.pp = {self.pp} does not divide the {num_layers} decoder layers; set "
                                  f"parallel.first_stage_layers to split them unevenly")
            return [num_layers // self.pp] * self.pp
        rest, others = num_layers - first, self.pp - 1
        if first < 1 or rest < others or rest % others:
            raise LayoutError(
                f"parallel.first_stage_layers = {first}: the other {num_layers - first} of the {num_layers} decoder "
                f"layers must split evenly over the other {others} pipeline stage(s), at least one layer each")
        return [first] + [rest // others] * others

    def first_stage_choices(self, num_layers: int, deepstack: int) -> list[int]:
        """The parallel.first_stage_layers values that put `deepstack` layers on stage 0 and split the rest evenly."""
        others = self.pp - 1
        return [n for n in range(max(deepstack, 1), num_layers) if others and (num_layers - n) >= others
                and (num_layers - n) % others == 0]

    def check_deepstack(self, num_layers: int, deepstack: int) -> None:
        """The first `deepstack` decoder layers (which add the vision tower's deepstack features) on stage 0."""
        if deepstack > num_layers:  # no layout helps: the model itself has too few layers for its vision tower
            raise LayoutError(
                f"the model has {num_layers} decoder layers but its vision tower adds {deepstack} deepstack features "
                f"to decoder layers 0..{deepstack - 1}: give it at least {deepstack} layers "
                f"(thinker_config.text_config.num_hidden_layers) or fewer "
                f"thinker_config.vision_config.deepstack_visual_indexes")
        on_first = self.stage_layers(num_layers)[0]
        if deepstack > on_first:
            fits = self.first_stage_choices(num_layers, deepstack)
            hint = f" (values that work here: {', '.join(map(str, fits))})" if fits else \
                " (no split of these layers works: use a smaller parallel.pp)"
            raise LayoutError(
                f"parallel.pp = {self.pp} puts {on_first} of the {num_layers} decoder layers on the first pipeline "
                f"stage, but the vision tower's {deepstack} deepstack features are added to decoder layers "
                f"0..{deepstack - 1}, which must sit on that stage with the tower: set parallel.first_stage_layers "
                f">= {deepstack}{hint}")

    def split_overrides(self) -> dict:
        """TransformerConfig fields of this pipeline split (none for the even split)."""
        if self.pp > 1 and self.first_stage_layers is not None:
            return {"num_layers_in_first_pipeline_stage": self.first_stage_layers}
        return {}
