"""The `download` stage: produce a verified HF checkpoint folder with a MANIFEST.json.

Sources: `tiny` (built here, no network), `local` (an existing folder, verified as a complete Qwen3-Omni
checkpoint from its headers, then linked), `huggingface` / `modelscope` (omni_model.hub, resumable). The manifest lists every file with size and sha256; a folder whose
files disagree with its manifest is never used silently.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .checkpoint_files import (MANIFEST, CheckpointError, build_manifest, list_files, read_safetensors_header,
                               verify_manifest, write_manifest)
from .configs import moe_layer_pattern
from .runtime.publish import fresh_staging, publish

# ------------------------------------------------------------------------------------------------ local checkpoints
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))  # either the fast tokenizer or BPE files
_SIDE_FILES = ("tokenizer_config.json", "preprocessor_config.json")


def expected_thinker_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape that the checkpoint's config.json implies, for the thinker's LLM (every tensor)
    and the main tensors of each vision block and audio layer (so a layer count or width mismatch is caught)."""
    thinker = config["thinker_config"]
    text, vision, audio = thinker["text_config"], thinker["vision_config"], thinker["audio_config"]
    hidden, vocab = text["hidden_size"], text["vocab_size"]
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = text.get("head_dim") or hidden // heads
    shapes = {"thinker.model.embed_tokens.weight": (vocab, hidden), "thinker.lm_head.weight": (vocab, hidden),
              "thinker.model.norm.weight": (hidden,)}
    for i, sparse in enumerate(moe_layer_pattern(text)):
        p = f"thinker.model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,),
        })
        if sparse:
            ffn = text["moe_intermediate_size"]
            shapes[p + "mlp.gate.weight"] = (text["num_experts"], hidden)
            experts = [f"{p}mlp.experts.{e}." for e in range(text["num_experts"])]
        else:
            ffn, experts = text["intermediate_size"], [p + "mlp."]
        for e in experts:
            shapes.update({e + "gate_proj.weight": (ffn, hidden), e + "up_proj.weight": (ffn, hidden),
                           e + "down_proj.weight": (hidden, ffn)})
    v_hidden = vision["hidden_size"]
    for i in range(vision["depth"]):
        shapes[f"thinker.visual.blocks.{i}.attn.qkv.weight"] = (3 * v_hidden, v_hidden)
        shapes[f"thinker.visual.blocks.{i}.mlp.linear_fc1.weight"] = (vision["intermediate_size"], v_hidden)
    d_model = audio["d_model"]
    for i in range(audio["encoder_layers"]):
        shapes[f"thinker.audio_tower.layers.{i}.self_attn.q_proj.weight"] = (d_model, d_model)
        shapes[f"thinker.audio_tower.layers.{i}.fc1.weight"] = (audio["encoder_ffn_dim"], d_model)
    return shapes


def _weight_files(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError):
            raise CheckpointError(f"{index.name}: not a safetensors index (no weight_map)") from None
        missing = sorted({name for name in weight_map.values() if not (path / name).is_file()})
        if missing:
            raise CheckpointError(f"{index.name} names files that are missing: {', '.join(missing[:5])}"
                                  + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        return sorted(set(weight_map.values()))
    return sorted(p.name for p in path.glob("*.safetensors"))


def local_checkpoint_problems(path: Path) -> list[str]:
    """What keeps `path` from being a complete Qwen3-Omni HF checkpoint (files, config, tensor shapes from the
    safetensors headers, tokenizer, preprocessor). Reads headers only: fast at any model size."""
    if not path.is_dir():
        return ["not a directory" if path.exists() else "no such directory"]
    problems = []
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        return ["config.json is missing"]
    except ValueError as exc:
        return [f"config.json is not valid JSON ({exc})"]
    if config.get("model_type") != "qwen3_omni_moe":
        problems.append(f"config.json model_type is {config.get('model_type')!r}, not 'qwen3_omni_moe' (Qwen3-Omni)")
    for names in (_SIDE_FILES + ("|".join("+".join(group) for group in _TOKENIZER_FILES),)):
        groups = [group.split("+") for group in names.split("|")]
        if not any(all((path / name).is_file() for name in group) for group in groups):
            problems.append(f"{' or '.join(' + '.join(g) for g in groups)} is missing")
    try:
        weight_files = _weight_files(path)
    except CheckpointError as exc:
        return problems + [str(exc)]
    if not weight_files:
        return problems + ["no *.safetensors weights (and no model.safetensors.index.json)"]
    found: dict[str, tuple] = {}
    for name in weight_files:
        try:
            found.update({key: tuple(meta["shape"]) for key, meta in read_safetensors_header(path / name).items()})
        except CheckpointError as exc:
            problems.append(str(exc))
    if problems or config.get("model_type") != "qwen3_omni_moe":
        return problems
    try:
        expected = expected_thinker_shapes(config)
    except (KeyError, TypeError) as exc:
        return [f"config.json lacks {exc} (not a Qwen3-Omni thinker config)"]
    missing = [key for key in expected if key not in found]
    wrong = [f"{key} {list(found[key])} != {list(shape)}" for key, shape in expected.items()
             if key in found and found[key] != shape]
    if missing:
        problems.append(f"{len(missing)} tensors that config.json implies are missing, e.g. {', '.join(missing[:3])}")
    if wrong:
        problems.append(f"{len(wrong)} tensors disagree with config.json's shapes, e.g. {'; '.join(wrong[:3])}")
    return problems + tokenizer_problems(path, config) + preprocessor_problems(path, config) + \
        encoder_problems(config)


# config.json's token id keys (thinker_config's, then the top level's) -> the token each names in the tokenizer.
# The model finds media placeholders by these ids while the data encoder writes the tokenizer's ids: they must agree.
_SPECIAL_TOKEN_KEYS = (
    ("thinker_config", {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                        "audio_token_id": "<|audio_pad|>", "vision_start_token_id": "<|vision_start|>",
                        "vision_end_token_id": "<|vision_end|>", "audio_start_token_id": "<|audio_start|>",
                        "audio_end_token_id": "<|audio_end|>", "user_token_id": "user"}),
    (None, {"im_start_token_id": "<|im_start|>", "im_end_token_id": "<|im_end|>", "system_token_id": "system",
            "user_token_id": "user", "assistant_token_id": "assistant", "tts_pad_token_id": "<tts_pad>",
            "tts_bos_token_id": "<tts_text_bos>", "tts_eos_token_id": "<tts_text_eod>"}),
)
# Activations the towers implement (omni_model.model.vision._ACTIVATIONS, audio.audio_transformer_config; a test
# keeps the vision list equal to the model's); transformers accepts more (e.g. quick_gelu), which convert cannot map.
VISION_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu", "silu")
AUDIO_ACTIVATIONS = ("gelu",)


def tokenizer_ids(path: Path) -> dict[str, int]:
    """token -> id of the checkpoint's tokenizer (tokenizer.json, else vocab.json + tokenizer_config.json's added
    tokens), read as JSON: no tokenizer library, well under a second for the 151k-token Qwen vocabulary."""
    if (path / "tokenizer.json").is_file():
        fast = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        ids = dict(fast.get("model", {}).get("vocab") or {})
        ids.update({token["content"]: token["id"] for token in fast.get("added_tokens", [])})
        return ids
    ids = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
    side = path / "tokenizer_config.json"
    added = json.loads(side.read_text(encoding="utf-8")).get("added_tokens_decoder", {}) if side.is_file() else {}
    ids.update({token["content"]: int(token_id) for token_id, token in added.items()})
    return ids


def tokenizer_problems(path: Path, config: dict) -> list[str]:
    """The tokenizer against config.json: every id inside the embedding (vocab_size rows), and each special token
    id of config.json equal to the tokenizer's id of that token."""
    try:
        ids = tokenizer_ids(path)
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        return [f"the tokenizer files are not readable tokenizer JSON ({exc})"]
    vocab = config["thinker_config"]["text_config"]["vocab_size"]
    problems = []
    largest = max(ids.items(), key=lambda item: item[1], default=None)
    if largest and largest[1] >= vocab:
        problems.append(f"the tokenizer has ids up to {largest[1]} ({largest[0]!r}) but config.json's "
                        f"thinker_config.text_config.vocab_size is {vocab}: the tokenizer is not this model's")
    for section, keys in _SPECIAL_TOKEN_KEYS:
        where = config.get(section, {}) if section else config
        for key, token in keys.items():
            if key not in where:
                continue
            name = f"{section}.{key}" if section else key
            if token not in ids:
                problems.append(f"config.json {name} = {where[key]} names {token!r}, which the tokenizer lacks")
            elif ids[token] != where[key]:
                problems.append(f"config.json {name} = {where[key]} but the tokenizer's {token!r} is {ids[token]}")
    return problems


def preprocessor_problems(path: Path, config: dict) -> list[str]:
    """preprocessor_config.json against config.json: the image geometry (patch, temporal patch, merge size) must be
    the vision tower's, and the mel bins (feature_size) the audio tower's."""
    try:
        pre = json.loads((path / "preprocessor_config.json").read_text())
    except ValueError as exc:
        return [f"preprocessor_config.json is not valid JSON ({exc})"]
    thinker = config["thinker_config"]
    pairs = [("merge_size", "vision_config", "spatial_merge_size"), ("patch_size", "vision_config", "patch_size"),
             ("temporal_patch_size", "vision_config", "temporal_patch_size"),
             ("feature_size", "audio_config", "num_mel_bins")]
    problems = []
    for key, tower, model_key in pairs:
        value, expected = pre.get(key), thinker.get(tower, {}).get(model_key)
        if value is not None and expected is not None and value != expected:
            problems.append(f"preprocessor_config.json {key} = {value} but config.json's thinker_config.{tower}."
                            f"{model_key} is {expected}")
    return problems


def encoder_problems(config: dict) -> list[str]:
    """Tower settings transformers accepts but this model does not implement (convert would fail at them)."""
    thinker = config["thinker_config"]
    problems = []
    for tower, key, known, default in (("vision_config", "hidden_act", VISION_ACTIVATIONS, "gelu_pytorch_tanh"),
                                       ("audio_config", "activation_function", AUDIO_ACTIVATIONS, "gelu")):
        value = thinker.get(tower, {}).get(key, default)
        if value not in known:
            problems.append(f"config.json thinker_config.{tower}.{key} = {value!r} is not implemented by "
                            f"omni_model's towers (supported: {', '.join(known)})")
    return problems


def check_local_checkpoint(path: Path) -> None:
    """Raise CheckpointError naming `path` (the user's folder) unless it is a complete Qwen3-Omni checkpoint."""
    problems = local_checkpoint_problems(Path(path))
    if problems:
        raise CheckpointError(f"model.path {path}: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------------ the sources
def fetch_tiny(out_dir: Path, seed: int) -> dict:
    from .tiny import write_tiny_checkpoint

    staging = fresh_staging(out_dir)
    write_tiny_checkpoint(staging, seed=seed)
    manifest = write_manifest(staging, {"kind": "tiny", "seed": seed})
    publish(staging, out_dir)
    return manifest


def fetch_random(out_dir: Path, record: dict) -> dict:
    """Random weights of `record["config"]` (+ overrides), written tensor by tensor (omni_model.random_checkpoint)."""
    from .random_checkpoint import write_random_checkpoint

    staging = fresh_staging(out_dir)
    write_random_checkpoint(staging, record["config"], record["overrides"], seed=record["seed"])
    manifest = write_manifest(staging, record)
    publish(staging, out_dir)
    return manifest


def fetch_local(out_dir: Path, path: Path) -> dict:
    """Verify a local checkpoint and expose it at out_dir by per-file symlinks (no copy of tens of GB).

    The folder must be a complete Qwen3-Omni checkpoint; if it carries a MANIFEST.json every file must match it.
    Every message names the user's folder; out_dir is not touched unless everything is right.
    """
    path = Path(path).resolve()
    check_local_checkpoint(path)
    if (path / MANIFEST).is_file():
        problems = verify_manifest(path)
        if problems:
            raise CheckpointError(f"model.path {path} does not match its {MANIFEST}: " + "; ".join(problems))
    staging = fresh_staging(out_dir)
    for rel in list_files(path):
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path / rel)
    manifest = write_manifest(staging, {"kind": "local", "path": str(path)})
    publish(staging, out_dir)
    return manifest


def fetch_hub(out_dir: Path, source: str, repo_id: str, revision: str | None, allow_patterns: list[str],
              endpoint: str | None, partial: Path | None = None) -> dict:
    """Download (resuming into a persistent partial folder), check against the hub's own hashes, publish.

    fetch_from_hub already verified (and repaired) every file against the hub's listing, or raised.
    """
    from .hub import fetch_from_hub

    partial = partial or out_dir.with_name(out_dir.name + ".partial")  # kept across interruptions: the client resumes
    partial.mkdir(parents=True, exist_ok=True)
    hub_files = fetch_from_hub(source, repo_id, revision, allow_patterns, partial, endpoint=endpoint)
    manifest = build_manifest(partial, {"kind": source, "id": repo_id, "revision": revision})
    for rel, meta in manifest["files"].items():
        claimed = hub_files.get(rel, {}).get("sha256")
        if claimed and claimed != meta["sha256"]:
            raise CheckpointError(f"{rel}: sha256 differs from the hub's ({claimed})")
    write_manifest(partial, manifest["source"])
    publish(partial, out_dir)
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


# The download stage is two steps so that a failure cannot cost the working model: `fetch_into` builds the new
# checkpoint in `<out_dir>.fetched` (or, when out_dir already is that checkpoint and intact, writes only a KEEP
# note there) and never touches out_dir; `publish_fetched` then swaps it in, which cannot fail halfway.
KEEP = "KEEP.json"


def fetched_dir(out_dir: Path) -> Path:
    return Path(out_dir).with_name(Path(out_dir).name + ".fetched")


def fetch_into(model_cfg: dict, out_dir: Path, fetched: Path, log=print) -> dict:
    """Make `fetched` the verified checkpoint of `model_cfg` (or a KEEP note when out_dir already is); returns the
    manifest. An intact out_dir of the same source is reused; a damaged one is refetched (hub: only the damaged
    files), rebuilt (tiny) or refused (local)."""
    out_dir, fetched = Path(out_dir), Path(fetched)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(fetched, ignore_errors=True)
    record = _source_record(model_cfg)
    manifest_path = out_dir / MANIFEST
    partial = out_dir.with_name(out_dir.name + ".partial")
    if manifest_path.is_file() and json.loads(manifest_path.read_text())["source"] == record:
        problems = verify_manifest(out_dir)
        if not problems:
            log(f"{out_dir}: intact against {MANIFEST}, nothing to fetch")
            fetched.mkdir(parents=True)
            (fetched / KEEP).write_text(manifest_path.read_text())
            return json.loads(manifest_path.read_text())
        log(f"{out_dir}: damaged, fetching again: " + "; ".join(problems))
        if record["kind"] in ("huggingface", "modelscope"):
            _keep_good_files_for_resume(out_dir, problems)
    elif out_dir.is_dir() and not manifest_path.is_file() and record["kind"] in ("huggingface", "modelscope"):
        if not partial.exists():  # files without a manifest (a killed publish): let the client reuse them
            os.replace(out_dir, partial)

    kind = record["kind"]
    if kind == "tiny":
        return fetch_tiny(fetched, record["seed"])
    if kind == "random":
        return fetch_random(fetched, record)
    if kind == "local":
        return fetch_local(fetched, Path(record["path"]))
    return fetch_hub(fetched, kind, record["id"], record["revision"],
                     model_cfg.get("allow_patterns", ["*"]), model_cfg.get("endpoint"), partial=partial)


def publish_fetched(fetched: Path, out_dir: Path) -> dict:
    """Put what fetch_into made at out_dir (one rename); returns the manifest now at out_dir."""
    fetched, out_dir = Path(fetched), Path(out_dir)
    if (fetched / KEEP).is_file():  # out_dir is already this checkpoint: only its manifest may need writing back
        manifest = json.loads((fetched / KEEP).read_text())
        tmp = out_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        publish(tmp, out_dir / MANIFEST)
        shutil.rmtree(fetched)
        return manifest
    manifest = json.loads((fetched / MANIFEST).read_text())
    publish(fetched, out_dir)
    return manifest


def fetch_checkpoint(model_cfg: dict, out_dir: Path, log=print) -> dict:
    """Make out_dir a verified checkpoint of `model_cfg`; returns its manifest (both steps above)."""
    fetched = fetched_dir(out_dir)
    fetch_into(model_cfg, out_dir, fetched, log=log)
    return publish_fetched(fetched, out_dir)


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


# ------------------------------------------------------------------------------------------------ the speech codec
def fetch_codec(model_cfg: dict, out_dir: Path, hf_dir: Path, log=print) -> dict:
    """The `codec` rule: the codec encoder of ``model.codec`` (data.speech.codec_source: the tiny random Mimi, a
    local folder linked file by file, or a Hugging Face repo) at out_dir with a MANIFEST.json, checked against the
    checkpoint at hf_dir (frame, rate, code groups, codebook: data.speech.SpeechCodec) before it is published.
    Returns the manifest."""
    from .data.speech import SpeechCodec, TalkerCodes, codec_source

    record = codec_source(model_cfg)
    if record is None:
        raise CheckpointError("model.codec is none: there is no codec to fetch")
    staging = fresh_staging(Path(out_dir))
    if record["kind"] == "tiny":
        from .tiny import write_tiny_codec

        write_tiny_codec(staging, seed=record["seed"], config=json.loads((Path(hf_dir) / "config.json").read_text()))
    elif record["kind"] == "local":
        source = Path(record["path"])
        if not (source / "config.json").is_file() or not list(source.glob("*.safetensors")):
            raise CheckpointError(f"model.codec {source}: not a codec folder (config.json + *.safetensors)")
        for path in sorted(source.iterdir()):
            if path.suffix in (".json", ".safetensors") and path.name != MANIFEST:
                (staging / path.name).symlink_to(path)
    else:
        from .hub import fetch_from_hub

        fetch_from_hub("huggingface", record["id"], None, ["*.json", "*.safetensors"], staging)
        shutil.rmtree(staging / ".cache", ignore_errors=True)
    codec = SpeechCodec(staging, TalkerCodes.from_config(Path(hf_dir)))  # raises CodecError naming the mismatch
    log(f"codec {record}: {codec.settings()['codec_model_type']}, {codec.codes.num_code_groups} code groups at "
        f"{codec.codes.frame_rate:g} frames/s")
    manifest = write_manifest(staging, record)
    publish(staging, Path(out_dir))
    return manifest
