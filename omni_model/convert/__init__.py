"""HF <-> Megatron-Core: the mapping table (mapping.py), conversion to a torch_dist checkpoint and the one loader
of any checkpoint into a built thinker (checkpoint.py), the parity gate (parity.py). CLI: `python -m omni_model.convert`."""

from .checkpoint import convert_checkpoint, load_checkpoint

__all__ = ["convert_checkpoint", "load_checkpoint"]
