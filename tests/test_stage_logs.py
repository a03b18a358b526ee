"""Stage logs as a user meets them (issue 10 item 4, issue 8 item 8): `snakemake convert` in a pseudo-terminal shows a
live progress bar on the terminal while logs/convert.log gets plain timestamped progress lines (rate, ETA) and the
counts at the end; a failing convert prints one console line pointing at its log, which holds the traceback; export
logs its progress per load group and its counts. The workflow starts from the session's tiny checkpoint put where
`download` publishes it (the download rule is tested elsewhere), so the whole module takes well under a minute."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from workflow_utils import REPO, SNAKEMAKE, snakemake, workflow_copy

STAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
NO_PARITY = "convert={parity: false}"  # the parity gate has its own tests; here only the logging matters
BAR_FRAME = re.compile(r"HF tensors read:\s+\d+%\|[^|]*\| [\d.]+\w*/[\d.]+\w* \[[\d:]+<[\d:?]+")  # tqdm: %| and ETA


@pytest.fixture(scope="module")
def wf(tiny_hf_dir, tmp_path_factory):
    from omni_model.download import write_manifest

    root = workflow_copy(tmp_path_factory.mktemp("stage_logs") / "wf")
    hf = root / "results" / "model" / "hf"
    shutil.copytree(tiny_hf_dir, hf)
    write_manifest(hf, {"kind": "tiny", "seed": 0})
    return root


def run_in_pty(workdir: Path, *command: str, timeout: float = 300) -> tuple[int, str]:
    """`command` with a pseudo-terminal as stdin/stdout/stderr (an interactive shell); returns (exit code, what the
    terminal showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # 30 x 120, as a terminal window
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TERM="xterm")
    proc = subprocess.Popen(list(command), cwd=workdir, env=env, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    shown = bytearray()
    deadline = time.time() + timeout
    selector = selectors.DefaultSelector()  # epoll: select() fails on descriptors >= 1024, as a long pytest run has
    selector.register(master, selectors.EVENT_READ)
    try:
        while time.time() < deadline:
            if selector.select(0.5):
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not data:
                    break
                shown += data
            elif proc.poll() is not None:
                break
    finally:
        selector.close()
        os.close(master)
        if proc.poll() is None:  # its jobs too (they share its new session's process group)
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=30), shown.decode(errors="replace")


@pytest.fixture(scope="module")
def interactive_convert(wf):
    code, terminal = run_in_pty(wf, SNAKEMAKE, "--cores", "2", "convert", "--config", NO_PARITY)
    assert code == 0, terminal[-4000:]
    return terminal


def test_interactive_convert_shows_a_bar_on_the_terminal_only(wf, interactive_convert):
    frames = BAR_FRAME.findall(interactive_convert)
    print(f"{len(frames)} bar frame(s) on the terminal, e.g. {frames[-1]!r}" if frames else interactive_convert[-3000:])
    assert frames, "no progress bar on the terminal"
    assert "\r" in interactive_convert.replace("\r\n", "")  # drawn in place
    log = (wf / "logs" / "convert.log").read_text()
    history = (wf / "logs" / "history" / "convert.log").read_text()
    for text in (log, history):
        assert "%|" not in text and "\r" not in text  # the log files keep plain lines


def test_convert_log_has_timestamped_progress_and_counts(wf, interactive_convert):
    log = (wf / "logs" / "convert.log").read_text()
    record = json.loads((wf / "results" / "model" / "mcore" / "convert.json").read_text())
    progress = re.findall(STAMP + r"INFO convert: convert rank 0: HF tensors read: ([\d.]+ [kMG]?B)/([\d.]+ [kMG]?B), "
                          r"[\d.]+ [kMG]?B/s, [\d.]+s elapsed(?:, ETA \d+s)?, tensors (\d+)/(\d+)$", log, re.M)
    print("\n".join(line for line in log.splitlines() if "convert rank 0" in line))
    assert len(progress) >= 2 and progress[-1][0] == progress[-1][1] and progress[-1][2] == progress[-1][3]
    for stage in ("thinker built at tp1 pp1 ep1 etp1", "saving the torch_dist checkpoint", "checkpoint saved in",
                  "parity gate skipped"):
        assert re.search(STAMP + r"INFO convert: .*" + stage, log, re.M), stage
    counts = re.search(STAMP + r"INFO convert: converted (\d+) thinker tensors \(([\d,]+) parameters in all parts\), "
                       r"(\d+) talker/code2wav tensors left for export", log, re.M)
    assert counts, log[-3000:]
    assert int(counts[1]) == record["thinker_tensors_read"] and int(counts[3]) == record["left_for_export"]["count"]
    assert int(counts[2].replace(",", "")) == sum(record["parameters"].values())
    assert re.search(STAMP + r"INFO convert: convert done in [\d.]+s$", log, re.M)


def test_a_failing_convert_is_one_console_line_and_a_traceback_in_the_log(wf, interactive_convert, tmp_path):
    """A damaged checkpoint under results/model/hf (one byte of the weights flipped): convert stops at its check."""
    bad = tmp_path / "wf"
    shutil.copytree(wf, bad, ignore=shutil.ignore_patterns(".snakemake", "logs"))
    weights = bad / "results" / "model" / "hf" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = snakemake(bad, "--cores", "2", "convert", "--forcerun", "convert", "--config", NO_PARITY)
    console = result.stdout + result.stderr
    failed = [line for line in console.splitlines() if line.startswith("[convert] FAILED")]
    print("\n".join(failed))
    assert result.returncode != 0
    assert len(failed) == 1 and failed[0].endswith("(full log: logs/convert.log)")
    assert "CheckpointError: results/model/hf is incomplete or corrupted" in failed[0] and "sha256" in failed[0]
    assert "Traceback (most recent call last)" not in console  # the traceback is in the log, not on the console
    log = (bad / "logs" / "convert.log").read_text()
    assert "Traceback (most recent call last)" in log and "in require_intact" in log
    assert re.search(STAMP + r"ERROR convert: convert failed after [\d.]+s: CheckpointError: ", log, re.M)


def test_export_logs_progress_and_counts(wf, interactive_convert, tmp_path):
    """The export script as the rule runs it, on the converted checkpoint (what `latest` names when train.iters is
    0): a progress line every tenth of the thinker's bytes (on a big model: every load group's worth), the counts."""
    from omni_model.train.checkpointing import write_latest

    train = tmp_path / "train"
    train.mkdir()
    write_latest(train, wf / "results" / "model" / "mcore" / "checkpoint")
    out = tmp_path / "export" / "hf"
    smk = SimpleNamespace(input=SimpleNamespace(train=str(train.with_suffix(".done")),  # the markers beside
                                                talker=str(tmp_path / "talker.done"),  # no talker run: no latest
                                                hf_manifest=str(wf / "results/model/hf/MANIFEST.json")),
                          output=SimpleNamespace(done=str(out.with_suffix(".done"))),
                          params=SimpleNamespace(export={"shard_size": 5_000_000_000}, use_te=False),
                          log=[str(tmp_path / "logs" / "export.log")])
    _load_script("export").main(smk)
    log = Path(smk.log[0]).read_text()
    print("\n".join(line for line in log.splitlines() if "INFO export" in line))
    progress = re.findall(STAMP + r"INFO export: export thinker: ([\d.]+ [kMG]?B)/([\d.]+ [kMG]?B), [\d.]+ [kMG]?B/s, "
                          r"[\d.]+s elapsed(?:, ETA \d+s)?, tensors (\d+)/(\d+)$", log, re.M)
    assert len(progress) >= 2, log[-3000:]  # every tenth of the bytes (the embedding alone is half of them)
    assert progress[-1][0] == progress[-1][1] and progress[-1][2] == progress[-1][3]
    counts = re.search(STAMP + r"INFO export: (\d+) thinker tensors from \S+, (\d+) talker tensors from (.+?), "
                       r"(\d+) tensors copied, (\d+) shard\(s\)", log, re.M)
    assert counts, log[-3000:]
    assert int(counts[1]) == int(progress[-1][3]) and int(counts[4]) > 0  # no talker run: the source talker copied
    assert int(counts[2]) == 0 and counts[3].startswith("(none")
    assert int(counts[5]) == len(list(out.glob("*.safetensors")))
    assert re.search(STAMP + r"INFO export: export done in [\d.]+s$", log, re.M)


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "workflow" / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_rank_is_named_on_the_console_and_its_traceback_is_in_the_log(tmp_path, capfd):
    """What finetune (and convert with procs > 1) do: run_torchrun inside stage_logging. Rank 1 raises: the one
    console line names its error, the log holds every rank's output timestamped and the rank's traceback."""
    from omni_model.runtime.launch import run_torchrun
    from omni_model.runtime.logs import StageFailed, stage_logging

    printed = tmp_path / "rank0_printed"
    # deterministic: rank 1 fails only once rank 0's line is out (under load torchrun stopped rank 0 before it printed)
    (tmp_path / "ranks_demo.py").write_text(
        "import os, pathlib, time\n"
        f"printed = pathlib.Path({str(printed)!r})\n"
        "print(f'rank {os.environ[\"RANK\"]} step 1', flush=True)\n"
        "if os.environ['RANK'] == '0':\n"
        "    printed.touch()\n"
        "    time.sleep(60)\n"
        "else:\n"
        "    deadline = time.time() + 120\n"
        "    while not printed.exists() and time.time() < deadline:\n"
        "        time.sleep(0.05)\n"
        "    raise ValueError('loss is nan at step 2')\n")
    log = tmp_path / "logs" / "finetune.log"
    with pytest.raises(StageFailed):
        with stage_logging(log, "finetune"):
            run_torchrun("ranks_demo", [], nproc_per_node=2, env={"PYTHONPATH": str(tmp_path)})
    console = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    print("\n".join(console))
    assert console == [f"[finetune] FAILED: RankFailed: ranks_demo failed on 2 rank(s) (exit 1): rank 1: "
                       f"ValueError: loss is nan at step 2  (full log: {log})"]
    text = log.read_text()
    assert re.search(STAMP + r"rank 0 step 1$", text, re.M) and re.search(STAMP + r"rank 1 step 1$", text, re.M)
    assert re.search(STAMP + r"Traceback \(most recent call last\):\n(.*\n)*?" + STAMP[1:]
                     + r"ValueError: loss is nan at step 2$", text, re.M)
    assert (log.parent / "history" / "finetune.log").read_text() == text


def test_the_console_names_the_failing_rank_not_the_first_traceback_in_the_output(tmp_path, capfd):
    """The ranks' output holds other tracebacks before the failure (a library printing a handled exception, e.g.
    Energon skipping a sample) and lines of other ranks in between: the console line is still the failing rank's own
    exception line, read from what that rank recorded, not from the interleaved output. Deterministic: rank 1
    raises only after rank 0's handled traceback is out."""
    from omni_model.runtime.launch import run_torchrun
    from omni_model.runtime.logs import StageFailed, stage_logging

    printed = tmp_path / "rank0_printed"
    (tmp_path / "ranks_noisy.py").write_text(
        "import os, pathlib, time, traceback\n"
        f"printed = pathlib.Path({str(printed)!r})\n"
        "if os.environ['RANK'] == '0':\n"
        "    try:\n"
        "        raise KeyError('sample 7: skipped')\n"
        "    except KeyError:\n"
        "        traceback.print_exc()\n"
        "    print('rank 0 step 1', flush=True)\n"
        "    printed.touch()\n"
        "    time.sleep(60)\n"
        "else:\n"
        "    while not printed.exists():\n"
        "        time.sleep(0.05)\n"
        "    raise ValueError('loss is nan at step 2')\n")
    log = tmp_path / "finetune.log"
    with pytest.raises(StageFailed):
        with stage_logging(log, "finetune"):
            run_torchrun("ranks_noisy", [], nproc_per_node=2, env={"PYTHONPATH": str(tmp_path)})
    console = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert console == [f"[finetune] FAILED: RankFailed: ranks_noisy failed on 2 rank(s) (exit 1): rank 1: "
                       f"ValueError: loss is nan at step 2  (full log: {log})"]
    text = log.read_text()
    assert "KeyError: 'sample 7: skipped'" in text  # the handled one is in the log, before the failure
    # the failing rank's traceback as one block (the stage's exception carries it), however the output interleaved
    assert re.search(r'Traceback \(most recent call last\):\n(  .*\n)+ValueError: loss is nan at step 2$', text, re.M)


STAGE_WITH_SLEEPING_RANKS = """
import os, sys
from omni_model.runtime.launch import run_torchrun
from omni_model.runtime.logs import stage_logging
with stage_logging(sys.argv[1], "finetune"):
    path = os.pathsep.join([sys.argv[2], os.environ["PYTHONPATH"]])
    run_torchrun("sleeper", [], nproc_per_node=2, env={"PYTHONPATH": path})
"""


@pytest.mark.parametrize("sig, line", [(signal.SIGINT, "interrupted (SIGINT)"), (signal.SIGTERM, "stopped (SIGTERM)")])
def test_a_stopped_stage_prints_one_line_and_stops_its_ranks(tmp_path, sig, line):
    """Ctrl-C (SIGINT to the terminal's foreground process group) or a SIGTERM from Snakemake / the scheduler while
    ranks run: the console gets the stage's one line, no Python traceback and nothing of torchrun's; the ranks stop."""
    from test_launch_orphans import _alive

    (tmp_path / "sleeper.py").write_text(
        "import os, pathlib, time\n"
        "pathlib.Path(f'rank{os.environ[\"RANK\"]}.pid').write_text(str(os.getpid()))\n"
        "time.sleep(120)\n")
    log = tmp_path / "finetune.log"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    stage = subprocess.Popen([sys.executable, "-c", STAGE_WITH_SLEEPING_RANKS, str(log), str(tmp_path)], cwd=tmp_path,
                             env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    pids = [tmp_path / "rank0.pid", tmp_path / "rank1.pid"]
    deadline = time.time() + 240
    while not all(p.exists() and p.read_text() for p in pids):
        assert stage.poll() is None and time.time() < deadline, stage.stderr.read()
        time.sleep(0.2)
    os.killpg(stage.pid, sig)  # the whole group, as a terminal's Ctrl-C does
    console = [text for text in stage.communicate(timeout=120)[1].splitlines() if text.strip()]
    assert console == [f"[finetune] FAILED: {line}  (full log: {log})"]
    assert stage.returncode == 128 + sig
    deadline = time.time() + 60
    while any(_alive(int(p.read_text())) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(int(p.read_text())) for p in pids)


def test_progress_lines_and_third_party_bars_in_a_stage_log(tmp_path):
    """Rate and ETA count only this run's work (a resumed run starts at `initial`); a library's own tqdm bar writing
    to stderr inside the stage leaves no frames in the log."""
    from tqdm import tqdm

    from omni_model.runtime.logs import Progress, progress_line, stage_logging

    assert progress_line(15, 20, 10.0, "steps", initial=10) == "15/20 steps, 0.5 steps/s, 10.0s elapsed, ETA 10s"
    assert progress_line(3e9, 4e9, 2.0, "B") == "3.00 GB/4.00 GB, 1.50 GB/s, 2.0s elapsed, ETA 1s"
    log = tmp_path / "stage.log"
    with stage_logging(log, "stage") as logger:
        for _ in tqdm(range(50), desc="Loading weights"):  # a library's bar: sys.stderr is the log here
            pass
        with Progress(20, "steps", log=logger, label="train", initial=10, every=5) as bar:
            for step in range(11, 21):
                bar.update(1, loss=f"{1 / step:.3f}")
    text = log.read_text()
    assert "\r" not in text and "Loading weights" not in text
    lines = re.findall(STAMP + r"INFO stage: train: (\d+)/20 steps, [\d.]+ steps/s, [\d.]+s elapsed(, ETA \d+s)?, "
                       r"loss ([\d.]+)$", text, re.M)
    assert [int(done) for done, _, _ in lines] == [15, 20] and lines[-1][1:] == ("", "0.050")


def test_a_library_bar_shows_on_the_terminal_only(tmp_path):
    """A library's own tqdm bar inside a stage (Data-Juicer's op bars, a hub download's): on an interactive terminal
    it is drawn there as one live line (erased when done), and the log gets none of its frames."""
    script = tmp_path / "stage.py"
    script.write_text(
        "from tqdm import tqdm\n"
        "from omni_model.runtime.logs import stage_logging\n"
        "with stage_logging('logs/datajuicer.log', 'datajuicer') as log:\n"
        "    for _ in tqdm(range(40), desc='text_length_filter_process', mininterval=0):\n"
        "        pass\n"
        "    log.info('kept 40')\n")
    code, terminal = run_in_pty(tmp_path, sys.executable, str(script), timeout=120)
    assert code == 0, terminal
    assert re.search(r"\rtext_length_filter_process: 100%\|[^|]*\| 40/40 \[", terminal), terminal[-2000:]
    assert terminal.rstrip().endswith("\r\x1b[K")  # the finished bar erased, no line left behind
    log = (tmp_path / "logs" / "datajuicer.log").read_text()
    assert "text_length_filter_process" not in log and "\r" not in log
    assert re.search(STAMP + r"INFO datajuicer: kept 40$", log, re.M)
