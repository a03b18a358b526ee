"""The typed config sections (omni_model.schema): their defaults are config/schema.yaml's, read here independently
with yaml; a default changed in the schema shows up in the section class; wrong types and unknown keys are refused
with the workflow's one-line messages, naming the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

SCHEMA = Path(__file__).resolve().parents[1] / "config" / "schema.yaml"


def schema_defaults(schema: dict, path: str) -> dict:
    section = schema
    for key in path.split("."):
        section = section["properties"][key]
    return {key: prop.get("default") for key, prop in section["properties"].items()}


def as_config(value):
    """A section field as the YAML config would hold it (tuples are lists there)."""
    if isinstance(value, tuple):
        return [as_config(v) for v in value]
    return value


@pytest.mark.parametrize("path, name", [("train", "TrainConfig"), ("train.lora", "LoraConfig"),
                                        ("parallel", "ParallelConfig"), ("data", "DataConfig")])
def test_every_default_is_the_schemas(path, name):
    import omni_model.schema as typed

    schema = yaml.safe_load(SCHEMA.read_text())
    section = getattr(typed, name)()
    expected = schema_defaults(schema, path)
    got = {key: as_config(getattr(section, key)) for key in expected if key != "lora"}
    assert got == {key: value for key, value in expected.items() if key != "lora"}
    assert [f for f in section.as_dict()] == list(expected)  # no key of our own, none missing


def test_a_default_changed_in_the_schema_shows_up():
    from omni_model.schema import section_class

    schema = yaml.safe_load(SCHEMA.read_text())
    changed = copy.deepcopy(schema)
    changed["properties"]["train"]["properties"]["iters"]["default"] = 77
    changed["properties"]["parallel"]["properties"]["tp"]["default"] = 4
    train = section_class("train", "Train", schema=changed)()
    parallel = section_class("parallel", "Parallel", schema=changed)()
    assert (train.iters, parallel.tp) == (77, 4)
    assert section_class("train", "Train", schema=schema)().iters == schema_defaults(schema, "train")["iters"] != 77


@pytest.mark.parametrize("section, message", [
    ({"train": {"lr": "fast"}}, "train.lr = 'fast': expected a number"),
    ({"train": {"iters": 2.5}}, "train.iters = 2.5: expected an integer"),
    ({"train": {"packing": "yes please"}}, "train.packing = 'yes please': expected true or false"),
    ({"train": {"lrr": 1e-4}}, "train.lrr: unknown key; did you mean 'lr'?"),
    ({"train": {"lora": {"rank": "big"}}}, "train.lora.rank = 'big': expected an integer"),
    ({"parallel": {"tp": 0}}, "parallel.tp = 0: must be >= 1"),
    ({"data": {"max_seq_len": "4k"}}, "data.max_seq_len = '4k': expected an integer"),
])
def test_a_bad_value_is_refused_naming_the_key(section, message):
    from omni_model.train.settings import SettingsError, TrainSettings

    with pytest.raises(SettingsError) as error:
        TrainSettings(hf_dir="", init_checkpoint="", shards="", train_dir="", **section)
    assert str(error.value).splitlines()[0].startswith(message), str(error.value)


def test_settings_read_by_attribute_and_survive_their_json(tmp_path):
    from omni_model.schema import DataConfig, ParallelConfig, TrainConfig
    from omni_model.train.settings import TrainSettings

    settings = TrainSettings(hf_dir="h", init_checkpoint="c", shards="s", train_dir=str(tmp_path),
                             train={"lr": 3e-4, "lora": {"enabled": True, "rank": 8}}, parallel={"tp": 2},
                             data={"max_seq_len": 1024})
    assert isinstance(settings.train, TrainConfig) and isinstance(settings.parallel, ParallelConfig)
    assert isinstance(settings.data, DataConfig)
    assert (settings.train.lr, settings.train.lora.rank, settings.parallel.tp, settings.data.max_seq_len) == \
        (3e-4, 8, 2, 1024)
    assert settings.lora.rank == 8 and settings.lora.alpha == settings.train.lora.alpha
    settings.dump(tmp_path / "settings.json")
    again = TrainSettings.load(tmp_path / "settings.json")
    assert again == settings and again.digest() == settings.digest()


def test_evaluation_without_val_samples_is_refused_by_name(tmp_path):
    """Shards whose val samples were all dropped have no `val` split part: a run with evaluation on says so and
    names the way out (Energon alone stops with `Invalid split part: 'val'`, as a GPU run of the LoRA test did)."""
    from omni_model.train.data import val_loader
    from omni_model.train.settings import TrainSettings

    meta = tmp_path / "shards" / ".nv-meta"
    meta.mkdir(parents=True)
    (meta / "split.yaml").write_text("split_parts:\n  train:\n  - train-{000000..000001}.tar\n")
    settings = TrainSettings(hf_dir=str(tmp_path), init_checkpoint=str(tmp_path), shards=str(tmp_path / "shards"),
                             train_dir=str(tmp_path / "train"), train={"eval_interval": 5})
    with pytest.raises(ValueError, match=r"train.eval_interval = 5, but the shards at .* have no val samples"):
        val_loader(settings)
