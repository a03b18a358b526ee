"""`model.source: random`: a random-weight checkpoint written tensor by tensor has exactly the names, shapes and dtype
that transformers' save_pretrained writes, loads with no missing/unexpected keys, is reproducible byte for byte, and
converts through the parity gate."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

OVERRIDES = {"thinker_config": {"text_config": {"num_hidden_layers": 3, "num_key_value_heads": 1,
                                                "mlp_only_layers": [1]}}}


def _headers(folder) -> dict:
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                out[key] = (tuple(piece.get_shape()), piece.get_dtype())
    return out


@pytest.fixture(scope="module")
def small_config():
    from omni_model.configs import tiny_config
    from omni_model.random_checkpoint import resolve_config

    return resolve_config(tiny_config(), OVERRIDES)


@pytest.fixture(scope="module")
def random_dir(small_config, tmp_path_factory):
    from omni_model.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("random") / "hf", small_config, seed=7,
                                   shard_bytes=8_000_000)


def test_same_names_shapes_dtype_as_save_pretrained(small_config, random_dir, tmp_path):
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    reference = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**small_config)).to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "ref")
    ours, theirs = _headers(random_dir), _headers(tmp_path / "ref")
    print(f"random checkpoint: {len(ours)} tensors in {len(list(random_dir.glob('*.safetensors')))} shards; "
          f"save_pretrained: {len(theirs)}")
    assert set(ours) == set(theirs)
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}
    assert any(k.startswith("talker.") for k in ours) and any(k.startswith("code2wav.") for k in ours)
    index = json.loads((random_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours)
    assert json.loads((random_dir / "config.json").read_text())["thinker_config"]["text_config"][
        "num_hidden_layers"] == 3
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "generation_config.json"):
        assert (random_dir / name).is_file(), name


def test_loads_in_transformers_without_missing_keys(random_dir):
    from transformers import Qwen3OmniMoeForConditionalGeneration

    model, info = Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(random_dir), output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    norm = model.thinker.model.language_model.norm.weight
    assert norm.dtype == torch.bfloat16 and 0.5 < norm.float().mean().item() < 1.5  # norm scales ~1, not 0.02


def test_same_seed_same_bytes(small_config, random_dir, tmp_path):
    from omni_model.random_checkpoint import write_random_checkpoint

    again = write_random_checkpoint(tmp_path / "again", small_config, seed=7, shard_bytes=8_000_000)
    digest = lambda folder: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}
    assert digest(again) == digest(random_dir)
    other = write_random_checkpoint(tmp_path / "other", small_config, seed=8, shard_bytes=8_000_000)
    assert digest(other)["model-00001-of-00004.safetensors"] != digest(random_dir)["model-00001-of-00004.safetensors"]


def test_random_checkpoint_converts_and_passes_the_gate(random_dir, tmp_path):
    """A config other than the tiny default (3 layers, a dense mlp_only layer, GQA 4:1) through convert + gate."""
    from omni_model.convert import convert_checkpoint
    from omni_model.convert.parity import run_parity_gate
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    convert_checkpoint(random_dir, tmp_path / "mcore", dtype="fp32")
    result = run_parity_gate(random_dir, tmp_path / "mcore", dtype="fp32")
    print(f"random config through the gate: max abs logit error {result['max_abs_error']:.2e}")
    assert result["pass"]
