"""The ``datajuicer`` stage: validate raw chat samples, run a Data-Juicer recipe, write processed.jsonl + drops.jsonl.

1. Validation (stage ``validate``): JSON, format, roles, empty assistant turns, tag/media counts, media files
   present, every medium decoded in full with the encoder's own checks (``decode``: a truncated image, non-finite or
   too-short audio, a video without decodable frames or timestamps). The decode gives the media fingerprints the
   dedup ops compare, so nothing is decoded twice and no undecodable file is ever kept as the original its copies
   are dropped against. Each failure is one drop with a precise reason.
2. Data-Juicer (stage ``datajuicer``): the recipe's ops run through Data-Juicer's Python API (``init_configs`` on a
   config file written for this run in its own work dir, ``load_ops``, each op's ``run``), one op at a time so that
   every dropped sample is attributed to its op, with the op's stats as the reason (or the kept sample it
   duplicates, for deduplicators). ``np`` (num_proc) = the rule's threads. With ``data.executor: ray`` the same ops
   run through Data-Juicer's Ray executor (ray_executor.py) and the same attribution gives the same drops.
3. Invariant: input lines = kept + dropped (checked; a violation raises).

Mapping to Data-Juicer's format and back is lossless: the DJ sample carries the canonical record as JSON in
``omni_record`` plus a text view (``text``: message contents, media tags as Data-Juicer's special tokens, one
message per line) and the absolute media path lists that DJ's media ops read. Ops that rewrite ``text`` (mappers)
are not propagated back; the default recipe has filters and deduplicators only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .formats import LIST_KEY, MEDIA_KINDS, TAG_RE, count_drops, drop_entry, load_raw
from .digest import FINGERPRINT_KEY, sample_fingerprint
from .media import MediaConfig, MediaError, check_audio_length, decode_audio, plan_video

log = logging.getLogger(__name__)

ID_KEY = "omni_id"
RECORD_KEY = "omni_record"
DJ_TOKENS = {"image": "<__dj__image>", "audio": "<__dj__audio>", "video": "<__dj__video>"}


# ------------------------------------------------------------------------------------------------ validation
def validate(raw_path: Path, fmt: str = "auto", fingerprints: dict | None = None, *, num_proc: int = 1,
             executor: str = "default", ray_address: str | None = None) -> tuple[list[dict], list[dict], int]:
    """Parse + structural checks + a full decode of every medium with the encoder's own checks (``check_media``, in
    ``num_proc`` processes, or in Ray tasks with ``executor`` ray). Returns (records, drops, n_input);
    ``fingerprints``, when given, is filled with sample id -> the media fingerprint (JSON) the decode gave, for the
    dedup ops (run_recipe), so media are decoded once."""
    records, drops, total = load_raw(Path(raw_path), fmt)
    good = []
    for record, (fingerprint, error) in zip(records, _checked(records, num_proc, executor, ray_address)):
        if error is not None:
            drops.append(drop_entry(record["id"], "validate", "decode", error))
            continue
        if fingerprints is not None:
            fingerprints[record["id"]] = fingerprint
        good.append(record)
    return good, drops, total


def _check_records(records: list[dict]) -> list[tuple[str | None, str | None]]:
    """check_media over a chunk of records: (fingerprint JSON, None) or (None, the reason); one pool or Ray task."""
    out = []
    for record in records:
        try:
            out.append((json.dumps(check_media(record)), None))
        except MediaError as exc:
            out.append((None, str(exc)))
    return out


def _checked(records: list[dict], num_proc: int, executor: str, ray_address: str | None, chunk: int = 8):
    """_check_records over all records, in input order, on the executor's workers."""
    if executor == "ray":
        from .ray_executor import ray_map

        return ray_map(_check_records, records, address=ray_address, num_cpus=num_proc, chunk=chunk)
    if num_proc <= 1 or len(records) <= chunk:
        return _check_records(records)
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=int(num_proc)) as pool:
        chunks = pool.map(_check_records, [records[i:i + chunk] for i in range(0, len(records), chunk)])
        return [result for results in chunks for result in results]


def check_media(record: dict) -> dict:
    """Decode every medium of ``record`` in full (digest.sample_fingerprint, strict) and apply the checks the encoder
    applies before encoding: audio at least media.min_audio_samples long, a video frame plan (plan_video: a stream
    without timestamps has none). Returns the sample's media fingerprint; raises MediaError naming the medium."""
    cfg = MediaConfig()  # the released preprocessor: the minimum audio length and the plan need no checkpoint

    def encoder_checks(key: str, path: str, fingerprint: dict) -> None:
        if key == "audios":
            check_audio_length(fingerprint["samples"], cfg)
        elif key == "videos":
            plan_video(Path(path).read_bytes(), cfg)

    check_speech(record)
    return sample_fingerprint({LIST_KEY[kind]: record[LIST_KEY[kind]] for kind in MEDIA_KINDS}, check=encoder_checks)


def check_speech(record: dict) -> None:
    """Decode every spoken answer in full (data.speech.load_speech's decode: soundfile, finite, not empty); raises
    MediaError naming the turn and the file. Its length is the shards stage's check (the talker's limit)."""
    for index, message in enumerate(record["messages"]):
        if message.get("speech"):
            try:
                decode_audio(Path(message["speech"]).read_bytes())
            except MediaError as exc:
                raise MediaError(f"speech of turn {index} ({Path(message['speech']).name}): {exc}") from None


# ------------------------------------------------------------------------------------------------ DJ mapping
def to_dj(record: dict, fingerprint: str | None = None) -> dict:
    text = "\n".join(TAG_RE.sub(lambda m: DJ_TOKENS[m.group(1)], message["content"])
                     for message in record["messages"])
    out = {"text": text, ID_KEY: record["id"], RECORD_KEY: json.dumps(record, ensure_ascii=False)}
    for kind in MEDIA_KINDS:
        out[LIST_KEY[kind]] = list(record[LIST_KEY[kind]])
    if fingerprint is not None:
        out[FINGERPRINT_KEY] = fingerprint
    return out


def from_dj(sample: dict) -> dict:
    return json.loads(sample[RECORD_KEY])


# ------------------------------------------------------------------------------------------------ running DJ
def _dj_config(recipe: dict, work_dir: Path, dataset_path: Path, num_proc: int) -> dict:
    config = {k: v for k, v in recipe.items() if k != "process"}
    config.update({
        "project_name": recipe.get("project_name", "omni-pipeline"),
        "dataset_path": str(dataset_path),
        "export_path": str(work_dir / "dj_export.jsonl"),
        "work_dir": str(work_dir),
        "np": int(num_proc),
        "text_keys": "text",
        "image_key": "images",
        "audio_key": "audios",
        "video_key": "videos",
        "use_cache": False,
        "ds_cache_dir": str(work_dir / "hf_cache"),
        "open_tracer": False,
        "skip_op_error": False,
        "process": recipe["process"],
    })
    return config


def _bounds(op) -> str:
    parts = []
    for name in sorted(vars(op)):
        if name.startswith(("min_", "max_")) and not name.endswith("_interval") and isinstance(getattr(op, name), (int, float)):
            value = getattr(op, name)
            if value < sys.maxsize:
                parts.append(f"{name}={value:g}")
    if hasattr(op, "any"):
        parts.append("any_or_all=" + ("any" if op.any else "all"))
    return ", ".join(parts)


def _fmt(value) -> str:
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        value = list(value.tolist() if hasattr(value, "tolist") else value)
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


EXECUTORS = ("default", "ray")


def run_recipe(records: list[dict], recipe_path: Path, work_dir: Path, num_proc: int = 1, *,
               executor: str = "default", ray_address: str | None = None,
               fingerprints: dict | None = None) -> tuple[list[dict], list[dict]]:
    """Run the recipe's ops on ``records``; returns (kept records in input order, drops). ``fingerprints``: sample id
    -> media fingerprint from validate (else the dedup ops compute them).

    ``executor``: ``default`` (Data-Juicer's local datasets, ``num_proc`` processes) or ``ray`` (Data-Juicer's Ray
    executor on the cluster at ``ray_address``; ``None`` starts a local one with ``num_proc`` CPUs for this run, see
    ray_executor.py). Both give the same kept set and the same drops with the same reasons."""
    from . import dj_ops  # noqa: F401  (registers omni ops)

    if executor not in EXECUTORS:
        raise ValueError(f"data.executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if not records:
        return [], []
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load(Path(recipe_path).read_text())
    if not isinstance(recipe, dict) or not isinstance(recipe.get("process"), list):
        raise ValueError(f"{recipe_path}: a Data-Juicer recipe needs a 'process' list")
    dataset_path = work_dir / "dj_input.jsonl"
    with open(dataset_path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(to_dj(record, (fingerprints or {}).get(record["id"])), ensure_ascii=False) + "\n")
    config_path = work_dir / "dj_config.yaml"
    config = _dj_config(recipe, work_dir, dataset_path, num_proc)
    config.update({"executor_type": executor, "ray_address": ray_address or "auto"})

    saved_tempdir, saved_streams = tempfile.tempdir, (sys.stdout, sys.stderr)
    with contextlib.ExitStack() as stack:
        # Data-Juicer makes temp_dir the process-wide tempfile dir, where its worker pool puts its AF_UNIX sockets
        # (paths of at most 107 bytes): under a deep work_dir np >= 2 failed with "AF_UNIX path too long", so a short
        # dir under the system temp dir, removed with the stack
        config["temp_dir"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="omni-dj-"))
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        try:
            from data_juicer.config import init_configs
            from data_juicer.ops import load_ops

            if executor == "ray":
                from data_juicer.utils.constant import RAY_JOB_ENV_VAR

                from .ray_executor import ray_cluster, restored_env

                stack.enter_context(restored_env(RAY_JOB_ENV_VAR))
                stack.enter_context(ray_cluster(ray_address, num_proc))
            cfg = init_configs(args=["--config", str(config_path)])
            sys.stdout, sys.stderr = saved_streams  # DJ redirects the streams into its own log file
            if executor == "ray":
                from .ray_executor import RayRecipeDataset

                data = RayRecipeDataset(cfg, {r["id"]: i for i, r in enumerate(records)}, ID_KEY, (RECORD_KEY,))
            else:
                data = _LocalDataset(dataset_path, work_dir)
            drops: list[dict] = []
            for op in load_ops(cfg.process):
                if executor != "ray" and num_proc <= 1:
                    map_in_this_process(op)
                started, ids_before = time.time(), data.ids()
                drops += _run_op(data, op, ids_before)
                log.info("datajuicer op %s: %d -> %d samples (%.2fs)", op._name, len(ids_before), len(data.ids()),
                         time.time() - started)
            kept_ids = set(data.ids())
        finally:
            tempfile.tempdir = saved_tempdir
            sys.stdout, sys.stderr = saved_streams
            _detach_dj_logger()
    kept_records = [r for r in records if r["id"] in kept_ids]
    return kept_records, drops


def map_in_this_process(op) -> None:
    """np 1: the op maps in this process. datasets (>= 4) runs `num_proc=1` in a pool of one forked process (a fork
    of a process with torch's threads: it segfaulted in the test suite); only `num_proc=None` maps in process, and an
    op hands None to its map only with its automatic parallelism off (it would pick the machine's core count)."""
    op.auto_op_parallelism = False
    op.num_proc = None


def _run_op(data, op, ids_before: list[str]) -> list[dict]:
    """Run one op on ``data`` (_LocalDataset or ray_executor.RayRecipeDataset) and return a drop for every sample it
    removed: deduplicators name the kept sample a duplicate duplicates, filters give the stats outside their bounds.

    When the op fails, its per-sample work is run on each sample alone (``data.sample_errors``): the samples it fails
    on are dropped with the error as the reason and the op runs again on the others. A failure no single sample
    reproduces is the op's own and is raised."""
    try:
        return _run_op_attributed(data, op, ids_before)
    except Exception:
        errors = data.sample_errors(op)
        if not errors:
            raise
    for sid, error in errors.items():
        log.warning("datajuicer op %s failed on sample %s: %s", op._name, sid, error)
    drops = [drop_entry(sid, "datajuicer", op._name, f"{op._name} failed on this sample: {errors[sid]}")
             for sid in ids_before if sid in errors]
    data.keep({sid for sid in ids_before if sid not in errors})
    return drops + (_run_op_attributed(data, op, data.ids()) if data.ids() else [])


def _run_op_attributed(data, op, ids_before: list[str]) -> list[dict]:
    kind = type(op).__mro__[1].__name__
    drops = []
    if hasattr(op, "compute_hash"):  # Deduplicator
        hashed, pairs = data.deduplicate(op)
        representative, kept = _representatives(hashed, pairs), set(data.ids())
        for sid in ids_before:
            if sid not in kept:
                other = representative.get(sid)
                reason = f"duplicate of {other}" if other else "duplicate"
                drops.append(drop_entry(sid, "datajuicer", op._name, f"{op._name}: {reason}"))
    elif kind == "Filter" or hasattr(op, "compute_stats"):
        stats_before, stats_after = data.filter(op)
        kept = set(data.ids())
        for sid, old, new in zip(ids_before, stats_before, stats_after):
            if sid in kept:
                continue
            added = {k: v for k, v in (new or {}).items() if k not in (old or {})} or (new or {})
            values = ", ".join(f"{k}={_fmt(v)}" for k, v in added.items())
            drops.append(drop_entry(sid, "datajuicer", op._name,
                                    f"{op._name}: {values} outside bounds ({_bounds(op)})"))
    else:  # mappers / selectors: run as-is, account for anything they remove
        data.apply(op)
        kept = set(data.ids())
        for sid in ids_before:
            if sid not in kept:
                drops.append(drop_entry(sid, "datajuicer", op._name, f"{op._name}: removed by op"))
    return drops


class _LocalDataset:
    """The stage's dataset with Data-Juicer's default (local) executor: a NestedDataset, ops run through ``op.run``."""

    def __init__(self, dataset_path: Path, work_dir: Path):
        from data_juicer.core.data import NestedDataset
        from datasets import load_dataset

        self.dataset = NestedDataset(load_dataset("json", data_files=str(dataset_path), split="train",
                                                  cache_dir=str(work_dir / "hf_cache")))

    def ids(self) -> list[str]:
        return self.dataset[ID_KEY]

    def deduplicate(self, op):
        hashed = op.run(self.dataset, reduce=False)
        self.dataset, pairs = op.process(hashed, show_num=len(hashed))
        return hashed, pairs

    def filter(self, op):
        from data_juicer.utils.constant import Fields

        with_stats = op.run(self.dataset, reduce=False)
        before = self.dataset[Fields.stats] if Fields.stats in self.dataset.column_names else [{}] * len(self.dataset)
        self.dataset = op.run(with_stats)
        return before, with_stats[Fields.stats]

    def apply(self, op) -> None:
        self.dataset = op.run(self.dataset)

    def sample_errors(self, op) -> dict:
        """sample id -> the op's error on that sample alone, for the samples it fails on (run_op's fallback)."""
        from .dj_ops import sample_error

        errors = {row[ID_KEY]: sample_error(op, row) for row in self.dataset}
        return {sid: error for sid, error in errors.items() if error}

    def keep(self, kept: set) -> None:
        from data_juicer.core.data import NestedDataset

        self.dataset = NestedDataset(self.dataset.select([i for i, sid in enumerate(self.ids()) if sid in kept]))


def _detach_dj_logger() -> None:
    """Data-Juicer adds loguru file sinks inside its work dir; drop them (the dir is temporary) and log to stderr."""
    try:
        from loguru import logger
    except ImportError:
        return
    logger.remove()
    logger.add(sys.stderr, level="INFO")


def _representatives(hashed, pairs: dict) -> dict:
    """dropped id -> id of the kept sample it duplicates: from the op's duplicate clusters (first = kept), and for
    samples no cluster names (Data-Juicer's exact ops trace at most two per cluster), from equal exact hashes."""
    from data_juicer.utils.constant import HashKeys

    out = {}
    for cluster in (pairs or {}).values():
        ids = [s[ID_KEY] for s in cluster]
        for sid in ids[1:]:
            out[sid] = ids[0]
    if HashKeys.hash in hashed.column_names:
        first = {}
        for sid, value in zip(hashed[ID_KEY], hashed[HashKeys.hash]):
            if value not in first:
                first[value] = sid
            elif sid not in out:
                out[sid] = first[value]
    return out


# ------------------------------------------------------------------------------------------------ the stage
def run_stage(raw_path: Path, recipe_path: Path, processed_path: Path, drops_path: Path, *,
              fmt: str = "auto", num_proc: int = 1, work_dir: Path | None = None, executor: str = "default",
              ray_address: str | None = None) -> dict:
    """Validate + Data-Juicer (``executor``/``ray_address``: see run_recipe); writes processed.jsonl and
    drops.jsonl; returns the counts summary."""
    started = time.time()
    processed_path, drops_path = Path(processed_path), Path(drops_path)
    processed_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if executor == "ray":  # one Ray session (a local one started once) for validation and the recipe
            from .ray_executor import ray_cluster

            stack.enter_context(ray_cluster(ray_address, num_proc))
        fingerprints: dict = {}
        records, drops, total = validate(Path(raw_path), fmt, fingerprints, num_proc=num_proc, executor=executor,
                                         ray_address=ray_address)
        log.info("validate: %d input lines, %d valid, %d dropped (%.2fs)", total, len(records), len(drops),
                 time.time() - started)
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="dj-run-", dir=work_dir or processed_path.parent))
        kept, dj_drops = run_recipe(records, Path(recipe_path), Path(tmp), num_proc=num_proc, executor=executor,
                                    ray_address=ray_address, fingerprints=fingerprints)
    drops += dj_drops
    if len(kept) + len(drops) != total:
        raise RuntimeError(f"drop accounting broken: {total} input != {len(kept)} kept + {len(drops)} dropped")
    with open(processed_path, "w", encoding="utf-8") as handle:
        for record in kept:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    with open(drops_path, "w", encoding="utf-8") as handle:
        for drop in drops:
            handle.write(json.dumps(drop, ensure_ascii=False) + "\n")
    summary = {"executor": executor, "input": total, "kept": len(kept), "dropped": len(drops), "by_stage_op": count_drops(drops),
               "seconds": round(time.time() - started, 2)}
    log.info("datajuicer stage summary: %s", json.dumps(summary))
    return summary
