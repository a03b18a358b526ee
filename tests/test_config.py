"""Config checks without Snakemake (fast): coercion of --config strings by the schema, one-line messages, unknown
keys in every section, the files the config names, the Data-Juicer recipe (ops and argument names)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from omni_model.config import ConfigError, check_config, coerce, recipe_problems

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "config" / "schema.yaml"
DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def _checked(**sections):
    config = copy.deepcopy(DEFAULT)
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(name), dict):
            config[name].update(values)
        else:
            config[name] = values
    return check_config(config, SCHEMA, root=REPO)


def _error(**sections) -> str:
    with pytest.raises(ConfigError) as error:
        _checked(**sections)
    message = str(error.value)
    print(message)
    return message


def test_nested_command_line_strings_are_coerced_by_the_schema():
    """Finding 3: `--config data='{max_seq_len: 4096}'` failed with "'4096' is not of type 'integer'"."""
    config = _checked(train={"lr": "1e-5", "packing": "false", "moe_aux_loss_coeff": "null", "peak_tflops": "989"},
                      data={"max_seq_len": "8192", "val_fraction": "0.2", "use_audio_in_video": "true"},
                      parallel={"tp": "2"})
    assert config["train"]["lr"] == 1e-5 and config["train"]["packing"] is False
    assert config["train"]["moe_aux_loss_coeff"] is None and config["train"]["peak_tflops"] == 989
    assert config["data"]["max_seq_len"] == 8192 and config["data"]["val_fraction"] == 0.2
    assert config["data"]["use_audio_in_video"] is True and config["parallel"]["tp"] == 2
    assert config["train"]["iters"] == DEFAULT["train"]["iters"]  # the rest of the section is kept


def test_free_form_overrides_get_yaml_scalars():
    schema = yaml.safe_load(SCHEMA.read_text())
    overrides = {"thinker_config": {"text_config": {"num_hidden_layers": "4", "rope_theta": "1e6"}}}
    coerced = coerce({"model": {"overrides": overrides}}, schema)["model"]["overrides"]
    assert coerced["thinker_config"]["text_config"]["num_hidden_layers"] == 4


@pytest.mark.parametrize("sections, expected", [
    ({"data": {"max_seq_len": "4k"}}, "data.max_seq_len = '4k': expected an integer"),
    ({"data": {"max_seq_len": "8"}}, "data.max_seq_len = 8: must be >= 16"),
    ({"data": {"val_fraction": "1"}}, "data.val_fraction = 1: must be >= 0 and < 1"),
    ({"train": {"lr": "0"}}, "train.lr = 0: must be > 0"),
    ({"train": {"packing": "maybe"}}, "train.packing = 'maybe': expected true or false"),
    ({"model": {"source": "bogus"}}, "model.source = 'bogus': must be one of: tiny, random, modelscope, huggingface"),
    ({"model": {"source": "local"}}, "model.path: required here but not set"),
    ({"train": {"lrr": "1e-5"}}, "train.lrr: unknown key; did you mean 'lr'?"),
    ({"data": {"max_seq_length": 4}}, "data.max_seq_length: unknown key; did you mean 'max_seq_len'?"),
    ({"modell": {"source": "tiny"}}, "modell: unknown key; did you mean 'model'?"),
    ({"parallel": {"cp": "2"}, "train": {"packing": "false"}}, "parallel.cp = 2 needs train.packing: true"),
    ({"parallel": {"cp": "2"}, "model": {"use_te": "true"}}, "parallel.cp = 2 runs on the local attention spec"),
])
def test_a_wrong_value_gets_one_line_with_key_value_and_what_is_allowed(sections, expected):
    message = _error(**sections)
    assert message.splitlines()[0].startswith(expected)
    assert len(message.splitlines()) == 1 and "properties" not in message and "$schema" not in message


def test_every_section_rejects_unknown_keys():
    schema = yaml.safe_load(SCHEMA.read_text())
    for name, section in schema["properties"].items():
        assert section.get("additionalProperties") is False, name
        assert f"{name}.typo_key: unknown key" in _error(**{name: {"typo_key": 1}})


@pytest.mark.parametrize("sections, expected", [
    ({"data": {"raw": "/no/such.jsonl"}}, "data.raw = '/no/such.jsonl': no such file"),
    ({"data": {"recipe": "config/no_recipe.yaml"}}, "data.recipe = 'config/no_recipe.yaml': no such file"),
    ({"model": {"source": "local", "path": "/no/such/ckpt"}}, "model.path = '/no/such/ckpt': no such file"),
    ({"data": {"raw": "config"}}, "data.raw = 'config': not a file"),
])
def test_files_the_config_names_must_exist(sections, expected):
    """Finding 1: a wrong data.raw / recipe path was ignored and the demo data used."""
    assert _error(**sections).startswith(expected)


def _recipe(tmp_path, process):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"process": process}))
    return path


def test_recipe_typos_are_named_before_any_job(tmp_path):
    """Finding 5: a misspelled op was a bare KeyError at line 490 of the stage's output."""
    problems = recipe_problems(_recipe(tmp_path, [
        {"text_lenght_filter": {"min_len": 10}},
        {"image_shape_filter": {"min_widht": 28}},
        {"omni_audio_duration_filter": {"max_duration": 30, "any_or_all": "all"}},
        {"document_minhash_deduplicator": {"window_size": 5, "lowercase": True}},
    ]))
    print("\n".join(problems))
    assert len(problems) == 2
    assert "process[0] unknown op 'text_lenght_filter'; did you mean 'text_length_filter'?" in problems[0]
    assert "process[1] op 'image_shape_filter': unknown argument 'min_widht'; did you mean 'min_width'?" in problems[1]


def test_without_data_juicer_installed_the_op_names_are_left_to_the_datajuicer_job(tmp_path, monkeypatch, capsys):
    """A GPU node that trains on data prepared elsewhere has no Data-Juicer: the check must not stop its run on
    'unknown op' for every op of the recipe, and says what it did not check; the recipe's structure is still checked."""
    import importlib.metadata

    installed = importlib.metadata.version

    def version(distribution):
        if distribution == "py-data-juicer":
            raise importlib.metadata.PackageNotFoundError(distribution)
        return installed(distribution)

    monkeypatch.setattr(importlib.metadata, "version", version)
    typo = _recipe(tmp_path, [{"text_lenght_filter": {"min_len": 10}}])
    assert recipe_problems(typo) == []
    assert f"Data-Juicer is not installed here: the op names of {typo} are not checked" in capsys.readouterr().err
    (tmp_path / "empty.yaml").write_text("process: []\n")
    assert recipe_problems(tmp_path / "empty.yaml") == [f"data.recipe {tmp_path / 'empty.yaml'}: needs a non-empty "
                                                        "'process' list of ops"]


def test_the_default_recipe_is_valid_and_checked_fast():
    import time

    started = time.time()
    assert recipe_problems(REPO / "config" / "datajuicer_recipe.yaml") == []
    print(f"recipe checked in {time.time() - started:.2f}s")
    assert time.time() - started < 5


def test_a_bad_recipe_stops_check_config(tmp_path):
    path = _recipe(tmp_path, [{"text_length_filter": {"min_len": 1, "max_lenght": 5}}])
    assert "unknown argument 'max_lenght'; did you mean 'max_len'?" in _error(data={"recipe": str(path)})


def test_a_misspelled_argument_of_our_duration_filters_is_named(tmp_path):
    """Our ops inherit __init__ from an unregistered base (dj_ops._MediaDurationFilter): its arguments, and
    Data-Juicer's base-op ones above it, are the ones accepted."""
    problems = recipe_problems(_recipe(tmp_path, [
        {"omni_video_duration_filter": {"max_duraton": 30, "video_key": "videos"}},
        {"omni_audio_duration_filter": {"min_duration": 1, "any_or_al": "all"}},
    ]))
    assert problems == [
        f"data.recipe {tmp_path / 'recipe.yaml'}: process[0] op 'omni_video_duration_filter': unknown argument "
        "'max_duraton'; did you mean 'max_duration'?",
        f"data.recipe {tmp_path / 'recipe.yaml'}: process[1] op 'omni_audio_duration_filter': unknown argument "
        "'any_or_al'; did you mean 'any_or_all'?"]


def test_ops_registered_by_f_string_or_in_a_subfolder_are_known(tmp_path):
    """document_minhash_deduplicator_with_uid is registered as f"{OP_NAME}_with_uid"; human_preference_annotation_
    mapper lives in mapper/annotation/: both are real ops of the installed Data-Juicer, not unknown ones."""
    problems = recipe_problems(_recipe(tmp_path, [
        {"document_minhash_deduplicator_with_uid": {"window_size": 5, "lowercas": True}},
        {"human_preference_annotation_mapper": {}},
    ]))
    assert problems == [f"data.recipe {tmp_path / 'recipe.yaml'}: process[0] op 'document_minhash_deduplicator_"
                        "with_uid': unknown argument 'lowercas'; did you mean 'lowercase'?"]
