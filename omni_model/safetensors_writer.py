"""The sharded safetensors writer, the one way shards are written (export, random checkpoints): a planned set of
tensors, headers first, then each tensor's bytes at their planned offset (memory never holds more than one tensor).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import torch

INDEX = "model.safetensors.index.json"

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class ExportError(RuntimeError):
    """The checkpoint cannot be exported against this source (missing tensor, wrong shape, unmapped name)."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are (absolute offsets in `file`) and what they are."""

    name: str
    dtype: str  # safetensors dtype name ("BF16", "F32", ...)
    shape: Tuple[int, ...]
    file: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def shard_file_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _natural_order(name: str):
    """layers.2 before layers.10: a shard holds consecutive layers."""
    return [int(part) if part.isdigit() else part for part in name.split(".")]


class ShardedSafetensorsWriter:
    """Writes a planned set of tensors (the source checkpoint's names, dtypes, shapes) into
    `model-0000i-of-0000n.safetensors` + the index, tensor by tensor in any order.

    Shards are filled in natural name order up to `shard_size` bytes (a larger tensor gets a shard of its own); each
    shard's header is written up front and every tensor's bytes go to their planned offset, so nothing is buffered.
    `finish()` checks that every planned tensor was written and writes the index (save_pretrained's format)."""

    def __init__(self, out_dir: Path, plan: Iterable[TensorEntry], shard_size: int):
        self.out_dir = Path(out_dir)
        shards: List[List[TensorEntry]] = [[]]
        used = 0
        for entry in sorted(plan, key=lambda e: _natural_order(e.name)):
            if shards[-1] and used + entry.nbytes > shard_size:
                shards.append([])
                used = 0
            shards[-1].append(entry)
            used += entry.nbytes
        self.total_size = sum(entry.nbytes for shard in shards for entry in shard)
        self.weight_map: Dict[str, str] = {}
        self._slots: Dict[str, Tuple[int, int, TensorEntry]] = {}  # name -> (shard, absolute offset, planned entry)
        self._files = []
        self._written: set = set()
        for i, shard in enumerate(shards):
            file_name = shard_file_name(i, len(shards))
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for entry in shard:
                header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape),
                                      "data_offsets": [offset, offset + entry.nbytes]}
                offset += entry.nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8-byte alignment
            handle = open(self.out_dir / file_name, "wb")
            self._files.append(handle)
            handle.write(struct.pack("<Q", len(blob)) + blob)
            handle.truncate(8 + len(blob) + offset)
            for entry in shard:
                self._slots[entry.name] = (i, 8 + len(blob) + header[entry.name]["data_offsets"][0], entry)
                self.weight_map[entry.name] = file_name

    def __enter__(self) -> "ShardedSafetensorsWriter":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._files:
            handle.close()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """A tensor of the plan, with the planned dtype and shape."""
        if name not in self._slots:
            raise ExportError(f"{name}: the export produced this tensor but the source checkpoint has no such tensor")
        planned = self._slots[name][2]
        if tuple(tensor.shape) != planned.shape:
            raise ExportError(f"{name}: exported shape {tuple(tensor.shape)} != source shape {planned.shape}")
        if _DTYPE_NAMES.get(tensor.dtype) != planned.dtype:
            raise ExportError(f"{name}: dtype {tensor.dtype} != source dtype {planned.dtype}")
        self._write_at(name, [tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data])

    def copy_from(self, entry: TensorEntry, chunk: int = 1 << 26) -> None:
        """A source tensor's bytes, unchanged (no decode; constant memory)."""
        planned = self._slots[entry.name][2]
        if (planned.dtype, planned.shape) != (entry.dtype, entry.shape):
            raise ExportError(f"{entry.name}: source {entry.dtype} {entry.shape} does not match the plan")

        def blocks():
            with open(entry.file, "rb") as source:
                source.seek(entry.begin)
                for start in range(0, entry.nbytes, chunk):
                    yield source.read(min(chunk, entry.nbytes - start))

        self._write_at(entry.name, blocks())

    def _write_at(self, name: str, blocks) -> None:
        if name in self._written:
            raise ExportError(f"{name}: produced twice")
        shard, offset, _ = self._slots[name]
        handle = self._files[shard]
        handle.seek(offset)
        for block in blocks:
            handle.write(block)
        self._written.add(name)

    def finish(self) -> None:
        missing = sorted(set(self._slots) - self._written)
        if missing:
            raise ExportError(f"{len(missing)} source tensors were never produced by the export, e.g. {missing[:5]}")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
