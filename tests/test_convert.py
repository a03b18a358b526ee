"""The convert stage's engine: HF safetensors -> torch_dist checkpoint of the thinker, loaded back bit for bit; the
side files and convert.json; strictness (missing / unclaimed / wrong-shape / wrong-dtype tensors fail naming the
tensor); a failed conversion publishes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def parallel():
    from omni_model.runtime.parallel import init_parallel

    init_parallel()


@pytest.fixture(scope="module")
def converted(tiny_hf_dir, tmp_path_factory, parallel):
    from omni_model.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("convert") / "mcore"
    record = convert_checkpoint(tiny_hf_dir, out, dtype="fp32")
    return out, record


def test_converted_checkpoint_loads_bit_exact(tiny_hf_dir, converted):
    from omni_model.convert import load_checkpoint
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.thinker import build_thinker

    out, _ = converted
    loaded = build_thinker(tiny_hf_dir, perform_initialization=False)
    load_checkpoint(loaded, out / "checkpoint")
    direct = build_thinker(tiny_hf_dir)
    load_hf_into_model(direct, tiny_hf_dir, prefix="")
    expected, got = direct.state_dict(), loaded.state_dict()
    keys = [k for k, v in expected.items() if torch.is_tensor(v) and not k.endswith("_extra_state")]
    assert any(k.startswith("audio_model.") for k in keys) and any(k.startswith("vision_model.") for k in keys)
    differing = [k for k in keys if not torch.equal(expected[k], got[k])]
    print(f"converted checkpoint: {len(keys)} tensors, {len(differing)} differ from the HF load")
    assert not differing


def test_convert_json_and_side_files(tiny_hf_dir, converted):
    out, record = converted
    on_disk = json.loads((out / "convert.json").read_text())
    assert on_disk["layout"] == {"tp": 1, "pp": 1, "ep": 1, "etp": 1, "cp": 1}
    assert on_disk["dtype"] == "fp32" and on_disk["use_te"] is False
    hf_names = [k for k in json.loads((tiny_hf_dir / "model.safetensors.index.json").read_text())["weight_map"]] \
        if (tiny_hf_dir / "model.safetensors.index.json").exists() else None
    left = on_disk["left_for_export"]["tensors"]
    assert left and all(k.startswith(("talker.", "code2wav.")) for k in left)
    assert on_disk["parameters"]["llm"] > 0 and on_disk["parameters"]["talker"] > 0
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                 "merges.txt", "chat_template.jinja", "preprocessor_config.json"):
        assert (out / name).read_bytes() == (tiny_hf_dir / name).read_bytes(), name
    assert not list(out.glob("*.safetensors")) and not out.with_name(out.name + ".staging").exists()
    assert hf_names is None or set(left) <= set(hf_names)


def _rewrite(tiny_hf_dir: Path, dest: Path, edit) -> Path:
    """A copy of the tiny checkpoint whose tensors went through `edit(dict)`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_hf_dir, dest)
    for path in dest.glob("*.safetensors"):
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})
    (dest / "model.safetensors.index.json").unlink(missing_ok=True)
    return dest


QKV = "thinker.model.layers.1.self_attn.k_proj.weight"
O_PROJ = "thinker.model.layers.2.self_attn.o_proj.weight"


def _drop(tensors):
    tensors.pop(QKV)


def _drop_whole_row(tensors):
    tensors.pop(O_PROJ)


def _extra(tensors):
    tensors["thinker.model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)


def _reshape(tensors):
    t = tensors[O_PROJ]
    tensors[O_PROJ] = torch.zeros(t.shape[0], t.shape[1] + 2, dtype=t.dtype)


def _retype(tensors):
    tensors[O_PROJ] = tensors[O_PROJ].float()


STRICT_CASES = {
    "missing_member_of_a_group": (_drop, rf"expected tensor {QKV} .* is missing"),
    "missing_tensor": (_drop_whole_row, rf"not filled.*{O_PROJ}"),
    "unclaimed_tensor": (_extra, r"claimed by no mapping row: \['thinker.model.layers.0.self_attn.extra_proj.weight'\]"),
    "wrong_shape": (_reshape, rf"{O_PROJ} -> .*mapped shape \(64, 66\) != model shape \(64, 64\)"),
    "wrong_dtype": (_retype, rf"{O_PROJ}: dtype F32 but the checkpoint's config declares bfloat16"),
}


@pytest.mark.parametrize("case", list(STRICT_CASES))
def test_strictness_names_the_tensor(tiny_hf_dir, tmp_path, parallel, case):
    from omni_model.convert import convert_checkpoint
    from omni_model.convert.mapping import MappingError

    edit, message = STRICT_CASES[case]
    bad = _rewrite(tiny_hf_dir, tmp_path / "hf", edit)
    out = tmp_path / "mcore"
    with pytest.raises(MappingError, match=message) as error:
        convert_checkpoint(bad, out, dtype="fp32")
    print(f"{case}: {error.value}")
    assert not out.exists(), "a failed conversion must not publish anything"


def test_grouped_save_is_the_one_shot_save(tiny_hf_dir, tmp_path, parallel):
    """Saved one unit at a time (each LLM layer, each tower) and merged, the checkpoint describes what megatron-core's
    own one-shot `dist_checkpointing.save` of the whole HF-loaded thinker writes: the same keys, global shapes, dtypes
    and chunks, and every tensor loads bit-identical from both."""
    from megatron.core import dist_checkpointing

    from omni_model.convert import convert_checkpoint, load_checkpoint
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.thinker import build_thinker

    record = convert_checkpoint(tiny_hf_dir, tmp_path / "grouped", dtype="fp32", group_bytes=0, log=lambda _: None)
    assert record["save_groups"] == 4 + 3  # 4 LLM layers, the rest of the LLM, vision, audio
    whole = build_thinker(tiny_hf_dir, perform_initialization=False)
    load_hf_into_model(whole, tiny_hf_dir, prefix="")
    (tmp_path / "one_shot").mkdir()
    dist_checkpointing.save(whole.sharded_state_dict(), str(tmp_path / "one_shot"))

    def described(path):
        stored = dist_checkpointing.load_tensors_metadata(str(path))
        return {key: (tuple(sh.global_shape), sh.dtype) for key, sh in stored.items()}

    grouped, one_shot = described(tmp_path / "grouped" / "checkpoint"), described(tmp_path / "one_shot")
    assert grouped == one_shot and len(grouped) > 100
    from torch.distributed.checkpoint import FileSystemReader

    def chunks(path):
        metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        return {key: sorted((tuple(c.offsets), tuple(c.sizes)) for c in m.chunks) if hasattr(m, "chunks") else "bytes"
                for key, m in metadata.items()}  # bytes: a ShardedObject (e.g. a module's _extra_state)

    assert chunks(tmp_path / "grouped" / "checkpoint") == chunks(tmp_path / "one_shot")
    expected = whole.state_dict()
    for path in (tmp_path / "grouped" / "checkpoint", tmp_path / "one_shot"):
        loaded = build_thinker(tiny_hf_dir, perform_initialization=False)
        load_checkpoint(loaded, path)
        got = loaded.state_dict()
        assert [k for k, v in expected.items() if torch.is_tensor(v) and not torch.equal(v, got[k])] == []


def test_merge_refuses_a_key_saved_twice(tmp_path, parallel):
    """Two parts that both hold a chunk of the same tensor do not merge (the checkpoint would be ambiguous)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from omni_model.convert.grouped_save import PART_PREFIX, GroupedSaveError, merge_parts

    for index in range(2):
        part = tmp_path / "parts" / PART_PREFIX.format(index)
        part.mkdir(parents=True)
        tensor = torch.arange(6.0).view(2, 3)
        dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", tensor, replica_id=0)}, str(part))
    with pytest.raises(GroupedSaveError, match=r"w at \(0, 0\) is saved by two parts"):
        merge_parts(tmp_path / "parts", 2, tmp_path / "checkpoint")


def test_merge_keeps_the_common_state_once_and_refuses_parts_that_differ(tmp_path, parallel):
    """mcore 0.19 saves a checkpoint's non-sharded entries as one 'common_state' object inside each part: the merged
    checkpoint holds it once (mcore's loader reads it back) and a part whose common state differs is refused."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from omni_model.convert.grouped_save import PART_PREFIX, GroupedSaveError, merge_parts

    def save_parts(root, iterations):
        for index, iteration in enumerate(iterations):
            part = root / PART_PREFIX.format(index)
            part.mkdir(parents=True)
            tensor = torch.full((2, 3), float(index))
            dist_checkpointing.save({f"w{index}": ShardedTensor.from_rank_offsets(f"w{index}", tensor, replica_id=0),
                                     "iteration": iteration}, str(part))

    save_parts(tmp_path / "same", [7, 7])
    assert merge_parts(tmp_path / "same", 2, tmp_path / "merged")["keys"] == 3  # w0, w1, common_state
    assert dist_checkpointing.load_common_state_dict(str(tmp_path / "merged")) == {"iteration": 7}
    loaded = dist_checkpointing.load({f"w{i}": ShardedTensor.from_rank_offsets(f"w{i}", torch.empty(2, 3), replica_id=0)
                                      for i in range(2)}, str(tmp_path / "merged"))
    assert [loaded[f"w{i}"].tolist() for i in range(2)] == [[[0.0] * 3] * 2, [[1.0] * 3] * 2]
    save_parts(tmp_path / "differ", [7, 8])
    with pytest.raises(GroupedSaveError, match=r"save part 1 has its own common state \['iteration'\]"):
        merge_parts(tmp_path / "differ", 2, tmp_path / "refused")
