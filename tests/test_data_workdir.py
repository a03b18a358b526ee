"""Running the workflow from another working directory: ``snakemake -s <workflow>/Snakefile -d <elsewhere>``.

The default config names the recipe shipped with the workflow (``config/datajuicer_recipe.yaml``); in a working
directory without that file it resolves next to the workflow (omni_model.config.resolve_workflow_files), while a
recipe of the same relative path in the working directory wins."""

from __future__ import annotations


import pytest
import yaml

from omni_model.config import resolve_workflow_files
from workflow_utils import snakemake, workflow_copy


def test_shipped_recipe_resolves_next_to_the_workflow_unless_the_working_directory_has_one(tmp_path):
    workflow, elsewhere = tmp_path / "wf", tmp_path / "elsewhere"
    (workflow / "config").mkdir(parents=True)
    (workflow / "config" / "datajuicer_recipe.yaml").write_text("process: []\n")
    elsewhere.mkdir()
    config = {"data": {"recipe": "config/datajuicer_recipe.yaml"}}
    resolve_workflow_files(config, workflow, root=elsewhere)
    assert config["data"]["recipe"] == str((workflow / "config" / "datajuicer_recipe.yaml").resolve())
    (elsewhere / "config").mkdir()
    (elsewhere / "config" / "datajuicer_recipe.yaml").write_text("process: []\n")
    config = {"data": {"recipe": "config/datajuicer_recipe.yaml"}}
    resolve_workflow_files(config, workflow, root=elsewhere)
    assert config["data"]["recipe"] == "config/datajuicer_recipe.yaml"  # the working directory's own file wins
    config = {"data": {"recipe": "mine.yaml"}}  # not shipped either: left as is for the config check to name
    resolve_workflow_files(config, workflow, root=elsewhere)
    assert config["data"]["recipe"] == "mine.yaml"


@pytest.mark.slow
def test_default_config_runs_from_another_working_directory(tmp_path):
    workflow = workflow_copy(tmp_path / "workflow")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    small = elsewhere / "small.yaml"  # the default config, with the smallest demo set to keep the test short
    small.write_text(yaml.safe_dump({"data": {"demo_samples": 8}}))
    result = snakemake(elsewhere, "shards", "-s", str(workflow / "Snakefile"), "-d", str(elsewhere), "--cores", "2",
                       "--configfile", str(small))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = yaml.safe_load((elsewhere / "results/data/shards/report.json").read_text())
    print(f"from another working directory: {report['input']} input, {report['kept']} kept, "
          f"{report['dropped']} dropped")
    assert report["kept"] == 8 and report["input"] == report["kept"] + report["dropped"]
    assert not (elsewhere / "config").exists() and not (workflow / "results").exists()
