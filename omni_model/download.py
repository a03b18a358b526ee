"""The `download` stage: produce a verified HF checkpoint folder with a MANIFEST.json.

Sources: `tiny` (built here, no network), `local` (an existing folder, verified and linked), `huggingface` /
`modelscope` (omni_model.hub, resumable). The manifest lists every file with size and sha256; a folder whose
files disagree with its manifest is never used silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

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


def _fresh_dir(out_dir: Path) -> Path:
    """A staging folder beside out_dir; a killed job leaves only `.staging`, never a half-written out_dir."""
    staging = out_dir.with_name(out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _publish(staging: Path, out_dir: Path) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        if out_dir.is_symlink() or out_dir.is_file():
            out_dir.unlink()
        else:
            shutil.rmtree(out_dir)
    os.replace(staging, out_dir)


def fetch_tiny(out_dir: Path, seed: int) -> dict:
    from .tiny import write_tiny_checkpoint

    staging = _fresh_dir(out_dir)
    write_tiny_checkpoint(staging, seed=seed)
    manifest = write_manifest(staging, {"kind": "tiny", "seed": seed})
    _publish(staging, out_dir)
    return manifest


def fetch_random(out_dir: Path, record: dict) -> dict:
    """Random weights of `record["config"]` (+ overrides), written tensor by tensor (omni_model.random_checkpoint)."""
    from .random_checkpoint import write_random_checkpoint

    staging = _fresh_dir(out_dir)
    write_random_checkpoint(staging, record["config"], record["overrides"], seed=record["seed"])
    manifest = write_manifest(staging, record)
    _publish(staging, out_dir)
    return manifest


def fetch_local(out_dir: Path, path: Path) -> dict:
    """Verify a local checkpoint and expose it at out_dir by per-file symlinks (no copy of tens of GB).

    If the folder carries a MANIFEST.json, every file must match it; otherwise a manifest is computed now.
    """
    path = Path(path).resolve()
    if not path.is_dir():
        raise CheckpointError(f"model.path {path} is not a directory")
    if (path / MANIFEST).is_file():
        problems = verify_manifest(path)
        if problems:
            raise CheckpointError(f"local checkpoint {path} does not match its {MANIFEST}: " + "; ".join(problems))
    staging = _fresh_dir(out_dir)
    for rel in list_files(path):
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path / rel)
    manifest = write_manifest(staging, {"kind": "local", "path": str(path)})
    _publish(staging, out_dir)
    return manifest


def fetch_hub(out_dir: Path, source: str, repo_id: str, revision: str | None, allow_patterns: list[str],
              endpoint: str | None) -> dict:
    """Download (resuming into a persistent partial folder), check against the hub's own hashes, publish.

    fetch_from_hub already verified (and repaired) every file against the hub's listing, or raised.
    """
    from .hub import fetch_from_hub

    partial = out_dir.with_name(out_dir.name + ".partial")  # kept across interruptions so the client can resume
    partial.mkdir(parents=True, exist_ok=True)
    hub_files = fetch_from_hub(source, repo_id, revision, allow_patterns, partial, endpoint=endpoint)
    manifest = build_manifest(partial, {"kind": source, "id": repo_id, "revision": revision})
    for rel, meta in manifest["files"].items():
        claimed = hub_files.get(rel, {}).get("sha256")
        if claimed and claimed != meta["sha256"]:
            raise CheckpointError(f"{rel}: sha256 differs from the hub's ({claimed})")
    write_manifest(partial, manifest["source"])
    _publish(partial, out_dir)
    return manifest


def _source_record(model_cfg: dict) -> dict:
    source = model_cfg["source"]
    if source == "tiny":
        return {"kind": "tiny", "seed": model_cfg.get("seed", 0)}
    if source == "local":
        return {"kind": "local", "path": str(Path(model_cfg["path"]).resolve())}
    if source == "random":
        config = str(model_cfg.get("config", "released-30b-a3b"))
        if config != "released-30b-a3b":
            config = str(Path(config).resolve())
        return {"kind": "random", "config": config, "overrides": model_cfg.get("overrides") or {},
                "seed": model_cfg.get("seed", 0)}
    # revision None = the hub's default branch (huggingface: main, modelscope: master)
    return {"kind": source, "id": model_cfg["id"], "revision": model_cfg.get("revision")}


def fetch_checkpoint(model_cfg: dict, out_dir: Path, log=print) -> dict:
    """Make out_dir a verified checkpoint of `model_cfg`; returns its manifest.

    An existing folder of the same source is verified against its manifest first: intact -> nothing is fetched;
    damaged -> the damaged files are re-fetched (hub), the model rebuilt (tiny), or a clear error (local).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    record = _source_record(model_cfg)
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file() and json.loads(manifest_path.read_text())["source"] == record:
        problems = verify_manifest(out_dir)
        if not problems:
            log(f"{out_dir}: intact against {MANIFEST}, nothing to fetch")
            return json.loads(manifest_path.read_text())
        log(f"{out_dir}: damaged, fetching again: " + "; ".join(problems))
        if record["kind"] in ("huggingface", "modelscope"):
            _keep_good_files_for_resume(out_dir, problems)
    elif out_dir.is_dir() and record["kind"] in ("huggingface", "modelscope"):
        partial = out_dir.with_name(out_dir.name + ".partial")
        if not partial.exists():  # files without a manifest (e.g. --forcerun removed it): let the client reuse them
            os.replace(out_dir, partial)

    kind = record["kind"]
    if kind == "tiny":
        return fetch_tiny(out_dir, record["seed"])
    if kind == "random":
        return fetch_random(out_dir, record)
    if kind == "local":
        return fetch_local(out_dir, Path(record["path"]))
    return fetch_hub(out_dir, kind, record["id"], record["revision"],
                     model_cfg.get("allow_patterns", ["*"]), model_cfg.get("endpoint"))


def _keep_good_files_for_resume(out_dir: Path, problems: list[str]) -> None:
    """Turn a damaged hub download back into a partial one: drop the bad files, keep the good ones."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for problem in problems:
        bad = out_dir / problem.split(":", 1)[0]
        if bad.is_file():
            bad.unlink()
    (out_dir / MANIFEST).unlink()
    os.replace(out_dir, partial)


def require_intact(model_dir: Path) -> dict:
    """For consumers (convert, export): the manifest must exist and every file must match it."""
    problems = verify_manifest(model_dir)
    if problems:
        raise CheckpointError(f"{model_dir} is incomplete or corrupted; rerun `snakemake download --forcerun "
                              f"download`: " + "; ".join(problems))
    return json.loads((Path(model_dir) / MANIFEST).read_text())
