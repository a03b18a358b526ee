"""Export (mcore dist checkpoint -> complete HF Qwen3-Omni): the untouched converted weights come back bit for bit,
on three model shapes and from two layouts; a checkpoint that does not fit is refused naming the tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Two more shapes besides the tiny default: other head counts and GQA ratios, expert counts and top-k, a dense
# (`mlp_only_layers`) layer, other deepstack indexes, tower depths and widths.
VARIANTS = {
    "wide": dict(
        text=dict(hidden_size=96, num_attention_heads=8, num_key_value_heads=2, head_dim=16, num_experts=16,
                  num_experts_per_tok=4, moe_intermediate_size=24, intermediate_size=48, mlp_only_layers=[1],
                  num_hidden_layers=3),
        vision=dict(depth=3, hidden_size=48, num_heads=2, intermediate_size=80, deepstack_visual_indexes=[0, 2]),
        audio=dict(encoder_layers=3, d_model=48, encoder_attention_heads=2, encoder_ffn_dim=96,
                   downsample_hidden_size=8)),
    "deep": dict(
        text=dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=16, num_experts=6,
                  num_experts_per_tok=3, moe_intermediate_size=16, intermediate_size=40, mlp_only_layers=[0],
                  num_hidden_layers=6),
        vision=dict(depth=2, hidden_size=64, num_heads=4, intermediate_size=128, deepstack_visual_indexes=[1]),
        audio=dict(encoder_layers=1, d_model=64, encoder_attention_heads=4, encoder_ffn_dim=128,
                   downsample_hidden_size=16)),
}
SHARD_SIZE = 8_000_000  # bytes: several output shards even for the tiny model
GROUP_BYTES = 1  # load one unit (a decoder layer, a tower, ...) at a time: the streaming path


@pytest.fixture(scope="module")
def hf_dirs(tiny_hf_dir, tmp_path_factory):
    from omni_model.tiny import tiny_variant, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("export_variants")
    dirs = {"tiny": tiny_hf_dir}
    for name, overrides in VARIANTS.items():
        dirs[name] = write_tiny_checkpoint(root / name, seed=1, config=tiny_variant(**overrides))
    return dirs


def hf_tensor_differences(expected_dir: Path, got_dir: Path) -> tuple[int, list[str]]:
    """(number of tensors, differences) between two HF dirs: names, dtypes, shapes and bytes of every tensor."""
    from safetensors import safe_open

    from omni_model.convert.export import source_tensors

    expected, got = source_tensors(expected_dir), source_tensors(got_dir)
    problems = [f"missing {n}" for n in sorted(set(expected) - set(got))]
    problems += [f"extra {n}" for n in sorted(set(got) - set(expected))]
    for name in sorted(set(expected) & set(got)):
        a = safe_open(str(expected[name].file), "pt").get_tensor(name)
        b = safe_open(str(got[name].file), "pt").get_tensor(name)
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            problems.append(f"{name}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}")
        elif not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
            problems.append(f"{name}: values differ")
    return len(expected), problems


def check_export(source: Path, ckpt: Path, out: Path) -> dict:
    """Export `ckpt` against `source`, then assert the result is `source` again, tensor for tensor."""
    from omni_model.convert.export import export_to_hf
    from omni_model.download import verify_manifest

    summary = export_to_hf(ckpt, source, out, shard_size=SHARD_SIZE, group_bytes=GROUP_BYTES, log=lambda _: None)
    count, problems = hf_tensor_differences(source, out)
    assert not problems, problems[:10]
    assert summary["thinker_tensors"] + summary["copied_tensors"] == count
    # the layout of a save_pretrained checkpoint: numbered shards, an index with the total size, every other file
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == summary["shards"] > 1
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert index["metadata"]["total_size"] == sum(
        (out / s).stat().st_size for s in shards) - sum(_header_bytes(out / s) for s in shards)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
                 "chat_template.jinja", "preprocessor_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert verify_manifest(out) == []
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["source"]["kind"] == "export" and manifest["source"]["checkpoint"] == str(ckpt.resolve())
    return {"tensors": count, **summary}


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


@pytest.mark.parametrize("name", ["tiny", "wide", "deep"])
def test_round_trip_tp1_fp32_is_bit_exact(name, hf_dirs, tmp_path):
    """bf16 source -> fp32 checkpoint (the CPU training dtype) -> bf16 export: the same bits."""
    from omni_model.convert import convert_checkpoint
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    convert_checkpoint(hf_dirs[name], tmp_path / "mcore", dtype="fp32", log=lambda _: None)
    result = check_export(hf_dirs[name], tmp_path / "mcore" / "checkpoint", tmp_path / "export")
    print(f"round trip {name} tp1 fp32: {result}, all bit-identical")


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    return env


# (layout, model) pairs converted by 2 ranks (gloo, bf16) in one torchrun launch. PP2 on "deep": its 6 layers split
# 3 + 3 with its one deepstack level on the first stage (the tiny default's 3 deepstack levels need 3 first-stage layers)
DIST_CASES = [("tp=2,ep=2", "tiny"), ("tp=2,ep=2", "wide"), ("tp=2,ep=2", "deep"), ("pp=2", "deep")]


@pytest.mark.slow
def test_round_trip_from_two_rank_layouts_is_bit_exact(hf_dirs, tmp_path):
    """Checkpoints converted by 2 ranks at TP2 + EP2 (all three shapes) and at PP2 export to the same bytes:
    dist_checkpointing reshards to the exporter's single-process layout."""
    triples = []
    for layout, name in DIST_CASES:
        triples += [layout, str(hf_dirs[name]), str(tmp_path / layout / name)]
    torchrun = Path(sys.executable).parent / "torchrun"
    subprocess.run([str(torchrun), "--nproc_per_node", "2", "--standalone",
                    str(REPO / "tests/dist/export_checkpoints.py"), "--dtype", "bf16", *triples],
                   check=True, cwd=REPO, env=_env(), timeout=900)
    for layout, name in DIST_CASES:
        converted = tmp_path / layout / name
        written_at = json.loads((converted / "convert.json").read_text())["layout"]
        assert all(written_at[key] == int(value) for key, value in (p.split("=") for p in layout.split(",")))
        result = check_export(hf_dirs[name], converted / "checkpoint", tmp_path / "export" / layout / name)
        print(f"round trip {name} from {layout} bf16: {result}, all bit-identical")


def _save_edited_checkpoint(hf_dir: Path, ckpt_dir: Path, edit) -> None:
    """A thinker checkpoint whose sharded state dict was changed by `edit(sharded_state_dict)` before saving."""
    from megatron.core import dist_checkpointing

    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.thinker import build_thinker

    thinker = build_thinker(json.loads((hf_dir / "config.json").read_text()), use_te=False)
    load_hf_into_model(thinker, hf_dir, prefix="")
    sharded = thinker.sharded_state_dict()
    edit(sharded)
    ckpt_dir.mkdir()
    dist_checkpointing.save(sharded, str(ckpt_dir))


def test_export_refuses_a_checkpoint_that_does_not_fit(tiny_hf_dir, tmp_path):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from omni_model.convert.export import ExportError, export_to_hf
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    missing_key = "language_model.decoder.layers.2.self_attention.linear_proj.weight"
    _save_edited_checkpoint(tiny_hf_dir, tmp_path / "missing", lambda sd: sd.pop(missing_key))
    with pytest.raises(ExportError, match=f"lacks the thinker tensor {missing_key}") as error:
        export_to_hf(tmp_path / "missing", tiny_hf_dir, tmp_path / "out", log=lambda _: None)
    print("missing tensor:", error.value)

    norm_key = "language_model.decoder.final_layernorm.weight"

    def widen_norm(sd):
        sd[norm_key] = ShardedTensor.from_rank_offsets(norm_key, torch.ones(65), replica_id=sd[norm_key].replica_id)

    _save_edited_checkpoint(tiny_hf_dir, tmp_path / "shape", widen_norm)
    with pytest.raises(ExportError, match=rf"{norm_key} .*checkpoint shape \(65,\) != model shape \(64,\)") as error:
        export_to_hf(tmp_path / "shape", tiny_hf_dir, tmp_path / "out", log=lambda _: None)
    print("wrong shape:", error.value)
    assert not (tmp_path / "out").exists()  # nothing published


def test_export_of_the_30b_thinker_holds_one_layer_at_a_time():
    """Streaming, measured on the released 30B-A3B shape (meta device, nothing allocated): the export's load units
    are one LLM layer each (all 128 experts of it), one unit per tower (mcore stacks a tower's layers under one
    checkpoint key), the embedding, the head...; the largest is a small fraction of the model."""
    import math
    import re

    from omni_model.configs import released_30b_a3b_config
    from omni_model.convert.export import _sharded_tensors, load_units, meta_thinker_sharded_state_dict
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    sharded = meta_thinker_sharded_state_dict(released_30b_a3b_config())
    units = load_units(sharded)
    assert sorted(n for unit in units for n in unit) == sorted(sharded)  # every tensor in exactly one unit

    def bf16_bytes(names):
        return 2 * sum(math.prod(sh.local_shape) for n in names for sh in _sharded_tensors(sharded[n]))

    llm_layers = [unit for unit in units if unit[0].startswith("language_model.decoder.layers.")]
    assert len(llm_layers) == 48
    for unit in llm_layers:
        assert len({re.match(r"language_model\.decoder\.layers\.(\d+)\.", n).group(1) for n in unit}) == 1
        assert sum(".experts.linear_fc1.weight" in n for n in unit) == 128
    total, largest = bf16_bytes(sharded), max(bf16_bytes(unit) for unit in units)
    print(f"30B-A3B thinker: {len(units)} load units, largest {largest / 1e9:.2f} GB of {total / 1e9:.1f} GB (bf16)")
    assert largest < 0.025 * total
