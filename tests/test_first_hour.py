"""A new user's first hour (issue 10), through the real Snakemake CLI on a private copy of the workflow.

One module-scoped run of the data stages (download -> datajuicer -> shards -> report_data, demo set of 16) is the
"good state"; every test starts from it and leaves it good. Each test names the finding it reproduces.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import yaml

from workflow_utils import SNAKEMAKE, snakemake, workflow_copy

pytestmark = pytest.mark.slow
TARGET = "report_data"  # every data stage + the data report items (convert/finetune/export are not needed here)


def _console(result) -> str:
    return result.stdout + result.stderr


def _mtimes(wf) -> dict:
    paths = ["results/model/hf/MANIFEST.json", "results/data/processed.jsonl", "results/data/shards/report.json",
             "results/report/data_summary.png"]
    return {p: (wf / p).stat().st_mtime_ns for p in paths}


@pytest.fixture(scope="module")
def wf(tmp_path_factory):
    wf = workflow_copy(tmp_path_factory.mktemp("first_hour") / "wf")
    config = yaml.safe_load((wf / "config/config.yaml").read_text())
    config["data"]["demo_samples"] = 16
    (wf / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (wf / "slurm").symlink_to("profiles/slurm")
    first = snakemake(wf, "--cores", "2", TARGET)
    assert first.returncode == 0, _console(first)[-4000:]
    (wf / "first_run_console.txt").write_text(_console(first))
    return wf


def _is_good(wf):
    plan = snakemake(wf, "-n", TARGET)
    assert plan.returncode == 0 and "Nothing to be done" in _console(plan), _console(plan)[-3000:]


# ------------------------------------------------------------------------------------------------ finding 1
def test_wrong_input_paths_stop_before_any_job(wf):
    """`shards --config data='{raw: /no/such.jsonl}'` exited 0 with the old demo shards; the 30B example config
    planned download + shards on the demo data."""
    before = _mtimes(wf)
    for override, expected in [("data={raw: /no/such.jsonl}", "data.raw = '/no/such.jsonl': no such file"),
                               ("data={recipe: no_recipe.yaml}", "data.recipe = 'no_recipe.yaml': no such file")]:
        result = snakemake(wf, "--cores", "2", "shards", "--config", override)
        print(_console(result)[-600:])
        assert result.returncode != 0 and expected in _console(result)
        assert "Config error (nothing was run)" in _console(result)
    result = snakemake(wf, "-n", "--configfile", "config/qwen3-omni-30b-a3b.yaml")
    assert result.returncode != 0 and "data.raw = 'data/train.jsonl': no such file" in _console(result)
    assert _mtimes(wf) == before


def test_named_inputs_are_rule_inputs(wf):
    """Editing the recipe (or the raw jsonl) makes the data stages stale (touching alone does not: Snakemake
    compares the recorded checksum of small inputs)."""
    recipe = wf / "config/datajuicer_recipe.yaml"
    text, stat = recipe.read_text(), recipe.stat()
    recipe.write_text(text.replace("min_len: 10", "min_len: 11"))
    plan = _console(snakemake(wf, "-n", TARGET))
    recipe.write_text(text)
    os.utime(recipe, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert "rule datajuicer:" in plan and "rule shards:" in plan and "rule fetch_model:" not in plan
    _is_good(wf)


# ------------------------------------------------------------------------------------------------ finding 3
def test_number_and_boolean_overrides_on_the_command_line(wf):
    """`--config data='{max_seq_len: 4096}'` failed with "'4096' is not of type 'integer'"."""
    plan = snakemake(wf, "-n", TARGET, "--config", "data={max_seq_len: 8192, use_audio_in_video: true}",
                     "train={lr: 2e-3, packing: false}")
    assert plan.returncode == 0, _console(plan)[-2000:]
    assert "rule shards:" in _console(plan) and "rule datajuicer:" not in _console(plan)  # only shards' params changed
    bad = snakemake(wf, "-n", TARGET, "--config", "data={max_seq_len: 4k}")
    range_error = snakemake(wf, "-n", TARGET, "--config", "data={max_seq_len: 8}")
    typo = snakemake(wf, "-n", TARGET, "--config", "train={lrr: 1e-5}")
    for result, expected in [(bad, "data.max_seq_len = '4k': expected an integer"),
                             (range_error, "data.max_seq_len = 8: must be >= 16"),
                             (typo, "train.lrr: unknown key; did you mean 'lr'?")]:
        print(_console(result).strip().splitlines()[-3:])
        assert result.returncode != 0 and expected in _console(result)


# ------------------------------------------------------------------------------------------------ finding 5
def test_recipe_typos_stop_before_any_job(wf):
    """A misspelled op was a bare KeyError at line 490 of 501 lines, after the stage had started."""
    recipe = yaml.safe_load((wf / "config/datajuicer_recipe.yaml").read_text())
    recipe["process"][0] = {"text_lenght_filter": {"min_len": 10}}
    (wf / "typo_recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = snakemake(wf, "--cores", "2", TARGET, "--config", "data={recipe: typo_recipe.yaml}")
    console = _console(result)
    print(console[-800:])
    assert result.returncode != 0
    assert "process[0] unknown op 'text_lenght_filter'; did you mean 'text_length_filter'?" in console
    assert len(console.splitlines()) < 10  # the message, not 500 lines
    _is_good(wf)


# ------------------------------------------------------------------------------------------------ finding 4
def test_a_bad_local_model_never_replaces_the_working_one(wf, tmp_path):
    """config.json + an 8-byte model.safetensors passed download, replaced the model, broke shards, deleted the
    manifest; messages named results/model/hf.staging; logs/*.log were empty."""
    before, manifest = _mtimes(wf), (wf / "results/model/hf/MANIFEST.json").read_bytes()
    junk = tmp_path / "my model"
    junk.mkdir()
    shutil.copy(wf / "results/model/hf/config.json", junk)
    (junk / "model.safetensors").write_bytes(b"\0" * 8)
    result = snakemake(wf, "--cores", "2", TARGET, "--config", f"model={{source: local, path: '{junk}'}}")
    console = _console(result)
    print(console[-1000:])
    assert result.returncode != 0 and "model.path is not a usable Qwen3-Omni checkpoint (nothing was run)" in console
    assert f"model.path {junk}: " in console and "model.safetensors: 8 bytes" in console
    assert "preprocessor_config.json is missing" in console and "staging" not in console

    # A folder whose headers are fine but whose files disagree with its own MANIFEST.json fails inside the job.
    damaged = tmp_path / "damaged"
    shutil.copytree(wf / "results/model/hf", damaged, symlinks=False)
    with open(damaged / "merges.txt", "r+b") as handle:
        handle.write(b"X")  # the first byte (merges.txt starts with "#version")
    result = snakemake(wf, "--cores", "2", TARGET, "--config", f"model={{source: local, path: '{damaged}'}}")
    console = _console(result)
    print(console[-1500:])
    assert result.returncode != 0
    assert re.search(r"\[download\] FAILED: CheckpointError: model\.path \S+damaged does not match its "
                     r"MANIFEST\.json: merges\.txt: sha256 mismatch \(corrupted\)\s+\(full log: logs/download\.log\)",
                     console)
    assert "hf.staging" not in console and "hf.fetched/" not in console
    log = (wf / "logs/download.log").read_text()
    assert "Traceback (most recent call last)" in log and "CheckpointError" in log
    assert (wf / "results/model/hf/MANIFEST.json").read_bytes() == manifest and _mtimes(wf) == before
    _is_good(wf)  # the original config finds everything up to date: nothing downstream was touched or made stale


# ------------------------------------------------------------------------------------------------ findings 2, 6, 7
def test_a_failing_stage_shows_one_line_and_keeps_noise_in_the_log(wf):
    """A failed datajuicer dumped Data-Juicer's ~450-line config table to the console; "Shell command: None" for
    every job; transformers' rope-key warning on the console."""
    recipe = yaml.safe_load((wf / "config/datajuicer_recipe.yaml").read_text())
    for op in recipe["process"]:
        if "omni_audio_duration_filter" in op:
            op["omni_audio_duration_filter"]["any_or_all"] = "sometimes"  # a valid name, a value the op refuses
    (wf / "bad_value_recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = snakemake(wf, "--cores", "2", "datajuicer", "--config", "data={recipe: bad_value_recipe.yaml}")
    console = _console(result)
    print(console[-1500:])
    assert result.returncode != 0
    assert "[datajuicer] FAILED: ValueError: any_or_all must be 'any' or 'all', got 'sometimes'" in console
    assert "(full log: logs/datajuicer.log)" in console
    assert "Shell command" not in console and "text_keys" not in console  # text_keys: a row of DJ's config table
    assert len(console.splitlines()) < 80, len(console.splitlines())
    log = (wf / "logs/datajuicer.log").read_text()
    assert "Traceback (most recent call last)" in log and len(log.splitlines()) > 100  # DJ's config table is here
    first = (wf / "first_run_console.txt").read_text()
    assert "Unrecognized keys in `rope_parameters`" not in first
    assert "Unrecognized keys in `rope_parameters`" in (wf / "logs/history/download.log").read_text()


def _kill_job_script(session: int, script: str) -> None:
    """SIGKILL the Python process running `script` among the processes of `session` (Snakemake's job)."""
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            if os.getsid(pid) == session and script in cmdline and pid != session:
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def test_an_interrupted_stage_is_redone_and_its_leftovers_removed(wf):
    """SIGKILL during datajuicer left its outputs deleted and dj-run-* behind; the next run said "Nothing to be
    done" (the outputs were not targets of `all`)."""
    # the previous test left datajuicer failed: its outputs are gone. `all` must plan it (its outputs are targets).
    plan = _console(snakemake(wf, "-n"))
    assert re.search(r"rule datajuicer:(.|\n)*?reason: Missing output files: (.|\n)*?results/data/processed.jsonl",
                     plan), plan[-3000:]
    process = subprocess.Popen([SNAKEMAKE, "--cores", "2", "datajuicer"], cwd=wf, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    staging = wf / "results/data/datajuicer.staging"
    deadline = time.time() + 300
    while not list(staging.glob("**/dj-run-*")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    _kill_job_script(process.pid, "datajuicer.py")  # what the OOM killer or a node failure does to the job
    process.wait(timeout=120)
    assert list(staging.glob("**/dj-run-*")), "the kill came too late to leave a work dir"
    assert not (wf / "results/data/processed.jsonl").exists()
    # Snakemake does not look behind an up-to-date target for missing intermediates, hence `all` (and a stage's
    # own target) list every contract output; here the stage target + the report, as `all` would run them.
    rerun = snakemake(wf, "--cores", "2", "datajuicer", TARGET)
    console = _console(rerun)
    assert rerun.returncode == 0, console[-3000:]
    assert "removed the leftover of an interrupted job: results/data/datajuicer.staging" in console
    assert not staging.exists() and not list((wf / "results/data").glob("dj-run-*"))
    for name in ("processed.jsonl", "drops.jsonl", "datajuicer_report.json"):
        assert (wf / "results/data" / name).is_file()
    _is_good(wf)


def test_logs_have_progress_counts_and_every_run(wf):
    """logs/shards.log had 2 lines written at the end; logs were replaced on each run."""
    shards_log = (wf / "logs/shards.log").read_text()
    print(shards_log[-1500:])
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO \S+: \d+/\d+ samples, [\d.]+ samples/s, [\d.]+s elapsed",
                     shards_log, re.M)
    assert re.search(r"INFO shards: input \d+ = kept \d+ \(train \d+, val \d+\) \+ dropped \d+; \d+ shards", shards_log)
    history = (wf / "logs/history/datajuicer.log").read_text()
    runs = re.findall(r"^===== datajuicer run .* =====$", history, re.M)
    assert len(runs) >= 3, runs  # first run, the failed one, the killed one, the rerun: all kept
    assert "any_or_all must be 'any' or 'all'" in history


# ------------------------------------------------------------------------------------------------ finding 8
def report_view(report_html, categories, tmp_path):
    """Open the report in headless Chromium, click through `categories` and every item's view button; returns
    {category/label: {png_width, frames, tables, audio}} as the browser rendered it: the first PNG's natural width,
    the embedded frames' sources, the rows of cell texts of every table in the shown HTML item (its iframe's document:
    readable with web security off) and the number of <audio> players in it."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed (the Makefile's apt step installs it from envs/apt.txt)")
    script = r"""<script>
(async function(){
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const clickText = t => { const el = [...document.querySelectorAll('a,td,li,span')].reverse()
      .find(e => e.textContent.trim() === t); if (el) el.click(); return !!el; };
  const out = {};
  await sleep(1000);
  for (const category of CATEGORIES) {
    clickText('Results'); await sleep(300);
    if (!clickText(category)) { out[category] = 'missing'; continue; }
    await sleep(500);
    for (const row of [...document.querySelectorAll('tr')].filter(tr => tr.querySelector('a[iconname=eye]'))) {
      row.querySelector('a[iconname=eye]').click(); await sleep(800);
      const imgs = [...document.querySelectorAll('img')].filter(i => i.naturalWidth > 0 && i.src.startsWith('data:image/png'));
      const docs = [document, ...[...document.querySelectorAll('iframe')].map(f => f.contentDocument).filter(d => d)];
      out[category + '/' + row.cells[0].textContent.trim()] = {png_width: imgs.length ? imgs[0].naturalWidth : 0,
        frames: [...document.querySelectorAll('iframe,embed,object')].map(f => (f.src || f.data || '').slice(0, 30)),
        tables: docs.slice(1).map(d => [...d.querySelectorAll('tr')].map(tr => [...tr.cells].map(c => c.innerText))),
        audio: docs.reduce((n, d) => n + d.querySelectorAll('audio').length, 0)};
    }
  }
  const pre = document.createElement('pre'); pre.id = 'omni-check'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script></body>""".replace("CATEGORIES", json.dumps(categories))
    head, tail = report_html.read_text().rsplit("</body>", 1)  # the last one: the page's own (JS holds others)
    probe = tmp_path / "probe.html"
    probe.write_text(head + script + tail)
    # web security off: the page's script may read the HTML items' iframes (data: URLs, another origin otherwise)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
             "--disable-web-security"]
    dom = subprocess.run([chromium, *flags, "--virtual-time-budget=30000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=180).stdout
    subprocess.run([chromium, *flags, "--virtual-time-budget=10000", f"--screenshot={tmp_path / 'report.png'}",
                    report_html.as_uri()], capture_output=True, timeout=180)
    found = re.search(r'<pre id="omni-check">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    return json.loads(html.unescape(found.group(1)))  # --dump-dom escapes the text's < > &


def test_report_holds_the_data_items_with_captions_and_renders(wf, tmp_path):
    """`snakemake --report` held the rule graph and runtimes, no results."""
    result = snakemake(wf, "--report", "report.html", TARGET)
    assert result.returncode == 0, _console(result)[-2000:]
    report_html = wf / "report.html"
    text = report_html.read_text()
    items = json.loads(re.search(r"var results = (\{.*?\});?\n", text).group(1))
    by_label = {item["labels"]["item"]: item for item in items.values()}
    print({label: (item["mime_type"], item["size"]) for label, item in by_label.items()})
    expected = {"kept and dropped": "image/png", "counts by stage and op": "text/html", "drop list": "text/html",
                "token lengths": "image/png", "data stages": "text/html"}
    assert {label: by_label[label]["mime_type"] for label in expected} == expected
    for label in expected:
        assert len(by_label[label]["caption"]) > 40, label
    seen = report_view(report_html, ["Data", "Benchmarks"], tmp_path)
    print(seen, "screenshot:", tmp_path / "report.png")
    assert seen["Data/kept and dropped"]["png_width"] == 800 and seen["Data/token lengths"]["png_width"] == 800
    for key in ("Data/drop list", "Data/counts by stage and op", "Benchmarks/data stages"):
        assert seen[key]["frames"] and seen[key]["frames"][0].startswith("data:text/html"), key


# ------------------------------------------------------------------------------------------------ finding 9
def _plan_resources(console: str) -> dict:
    plan = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", console):
        name = re.match(r"(?:local)?rule (\w+):", block)
        resources = re.search(r"resources: (.*)", block)
        if name and resources:
            plan[name.group(1)] = dict(item.split("=", 1) for item in resources.group(1).split(", "))
    return plan


def test_slurm_profile_puts_cpu_rules_on_cpu_and_gpu_rules_on_gpu(wf):
    """The Slurm profile sent demo_data to the `gpu` partition and had an empty account."""
    result = snakemake(wf, "--profile", "slurm", "-n", "--forceall", "finetune", TARGET,
                       "--config", "train={gpus_per_node: 8, global_batch_size: 16}")
    assert result.returncode == 0, _console(result)[-3000:]
    plan = _plan_resources(_console(result))
    print({rule: (res.get("slurm_partition"), res.get("gpu"), res.get("runtime")) for rule, res in plan.items()})
    for rule in ("demo_data", "fetch_model", "datajuicer", "shards", "report_data"):
        assert plan[rule]["slurm_partition"] == "cpu", rule
        assert plan[rule].get("gpu", "0") == "0", rule
    for rule in ("convert", "finetune"):
        assert plan[rule]["slurm_partition"] == "gpu", rule
    assert plan["finetune"]["gpu"] == "8" and plan["convert"]["gpu"] == "1"
    assert plan["fetch_model"]["runtime"] == "720" and plan["finetune"]["runtime"] == "2880"
    assert plan["shards"]["mem_mb"] == "4000"
