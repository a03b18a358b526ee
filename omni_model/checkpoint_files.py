"""The files of an HF checkpoint folder as every stage reads and writes them: the manifest (every file with size and
sha256; written last, so its presence means complete) and safetensors headers (read without the tensor data).
The shards themselves are written by omni_model.safetensors_writer.

Used by the download stage, convert and export; it imports nothing of omni_model and not torch (the download module,
imported on every `snakemake` plan, needs it), so none of them imports another for these helpers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# ------------------------------------------------------------------------------------------------ manifest
MANIFEST = "MANIFEST.json"
_REQUIRED = ("config.json",)


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or corrupted."""


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def list_files(model_dir: Path) -> list[str]:
    """Relative paths of the checkpoint's files (hidden client caches and the manifest excluded)."""
    files = []
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir)
        if path.is_file() and rel.name != MANIFEST and not any(p.startswith(".") for p in rel.parts):
            files.append(rel.as_posix())
    return files


def build_manifest(model_dir: Path, source: dict) -> dict:
    files = {rel: {"size": (model_dir / rel).stat().st_size, "sha256": sha256_of(model_dir / rel)}
             for rel in list_files(model_dir)}
    missing = [name for name in _REQUIRED if name not in files]
    if missing:
        raise CheckpointError(f"{model_dir} is not an HF checkpoint: missing {missing}")
    if not any(name.endswith(".safetensors") for name in files):
        raise CheckpointError(f"{model_dir} holds no *.safetensors weights")
    return {"source": source, "files": files}


def write_manifest(model_dir: Path, source: dict) -> dict:
    manifest = build_manifest(model_dir, source)
    tmp = model_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, model_dir / MANIFEST)  # the manifest appears last and atomically: its presence means complete
    return manifest


def verify_manifest(model_dir: Path, manifest: dict | None = None) -> list[str]:
    """Problems of `model_dir` against its manifest (empty list = intact). Checks size first, then sha256."""
    model_dir = Path(model_dir)
    if manifest is None:
        path = model_dir / MANIFEST
        if not path.is_file():
            return [f"{path} is missing"]
        manifest = json.loads(path.read_text())
    problems = []
    for rel, meta in manifest["files"].items():
        path = model_dir / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != meta["size"]:
            problems.append(f"{rel}: size {path.stat().st_size} != {meta['size']} (truncated or replaced)")
        elif sha256_of(path) != meta["sha256"]:
            problems.append(f"{rel}: sha256 mismatch (corrupted)")
    return problems


# ----------------------------------------------------------------------------------------- safetensors headers
def read_safetensors_header(path: Path) -> dict:
    """{tensor name: {"dtype", "shape", "data_offsets"}} from the file's header (no tensor data is read); raises
    CheckpointError when the file is not safetensors or is shorter than its header says."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if size <= 8:
            raise CheckpointError(f"{path.name}: {size} bytes, not a safetensors file")
        length = int.from_bytes(head, "little")
        if length > size - 8 or length > 100_000_000:
            raise CheckpointError(f"{path.name}: header length {length} exceeds the file ({size} bytes)")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            raise CheckpointError(f"{path.name}: unreadable safetensors header") from None
    header.pop("__metadata__", None)
    data_end = max((meta["data_offsets"][1] for meta in header.values()), default=0)
    if 8 + length + data_end > size:
        raise CheckpointError(f"{path.name}: truncated ({size} bytes, the header needs {8 + length + data_end})")
    return header
