"""The row type of the declarative HF <-> mcore parameter table.

One row says: this HF on-disk tensor (or group of tensors) is that mcore tensor, after this transform, split
along this dim across tensor-parallel ranks. Placeholders `{i}` (layer index) and `{e}` (expert index) appear in
both patterns. Every mapping in the project is a list of these rows; no name logic lives anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    # HF key pattern(s) as stored in the safetensors of the release (e.g. "thinker.model.layers.{i}.mlp.gate.weight").
    # A transform that fuses several HF tensors (q/k/v, gate/up) lists them in order.
    hf: tuple[str, ...]
    # mcore state-dict key pattern (e.g. "language_model.decoder.layers.{i}.mlp.router.weight").
    mcore: str
    # name of a transform in omni_model.convert.mapping.TRANSFORMS ("identity", "qkv", "gate_up", ...)
    transform: str = "identity"
    # dim of the mcore tensor that is split across TP ranks; None = replicated on every TP rank
    tp_dim: int | None = None

    def __post_init__(self):
        if isinstance(self.hf, str):
            object.__setattr__(self, "hf", (self.hf,))
