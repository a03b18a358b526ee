"""One way for a stage to log: everything into the rule's log file, appended per run, with a traceback on failure.

    with stage_logging(snakemake.log[0], "shards") as log:
        for record in progress(records, every=100, what="samples", log=log):
            ...
        log.info("kept %d, dropped %d", kept, dropped)

- Each run opens with a `===== <stage> run <time> =====` header. Snakemake deletes a job's log file before the job
  starts, so the log holds the latest run and every line is also appended to `<log dir>/history/<log name>`, which
  keeps all runs (never replaced).
- stdout/stderr of the process (third-party prints, warnings, transformers' and Data-Juicer's loggers, loguru) go
  to the file, not to the console; the console gets one line per failure pointing at the log.
- On an exception the full traceback is written to the log and the stage exits with that one console line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"


class StageFailed(SystemExit):
    """Raised (as SystemExit(1)) after the traceback went to the log; the console has the one-line summary."""


def history_path(log_path: Path) -> Path:
    return Path(log_path).parent / "history" / Path(log_path).name


class _Tee:
    """A text stream writing to the run's log and to the history (both appended, line-buffered)."""

    def __init__(self, *paths: Path):
        self.files = []
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.files.append(open(path, "a", buffering=1, encoding="utf-8", errors="replace"))

    def write(self, text: str) -> int:
        for handle in self.files:
            handle.write(text)
        return len(text)

    def flush(self) -> None:
        for handle in self.files:
            handle.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:  # for libraries that ask (faulthandler, subprocess): the run's log
        return self.files[0].fileno()

    def close(self) -> None:
        for handle in self.files:
            handle.close()


@contextlib.contextmanager
def stage_logging(log_path, stage: str, level: int = logging.INFO) -> Iterator[logging.Logger]:
    """Send the stage's logging, stdout and stderr to `log_path` (appended, with a run header); on failure write
    the traceback there and print one line to the console. Yields the stage's logger."""
    log_path = Path(log_path)
    stream = _Tee(log_path, history_path(log_path))
    console = sys.__stderr__
    saved = sys.stdout, sys.stderr
    stream.write(f"===== {stage} run {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()}) =====\n")
    sys.stdout = sys.stderr = stream
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    root.handlers = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    _quiet_third_party()
    _route_loguru(stream)
    log = logging.getLogger(stage)
    started = time.time()
    try:
        yield log
        log.info("%s done in %.1fs", stage, time.time() - started)
    except BaseException as exc:  # noqa: BLE001  (KeyboardInterrupt too: the log says the run was interrupted)
        stream.write(traceback.format_exc())
        summary = _one_line(exc)
        log.error("%s failed after %.1fs: %s", stage, time.time() - started, summary)
        console.write(f"[{stage}] FAILED: {summary}  (full log: {log_path})\n")
        console.flush()
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise StageFailed(1) from None
    finally:
        stream.flush()
        sys.stdout, sys.stderr = saved
        root.handlers, root.level = saved_handlers, saved_level
        logging.captureWarnings(False)
        stream.close()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 400:
        first = first[:400] + " ..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _quiet_third_party() -> None:
    """transformers logs through its own handler to the real stderr; point it at ours (the log file)."""
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    warnings.simplefilter("default")


def _route_loguru(stream) -> None:
    """Data-Juicer logs through loguru (its own sinks, incl. stderr captured at import): send it to the log."""
    loguru = sys.modules.get("loguru")
    if loguru is None:
        return
    with contextlib.suppress(Exception):
        loguru.logger.remove()
        loguru.logger.add(stream, level="INFO")


def progress(items: Iterable, *, every: int = 100, total: Optional[int] = None, what: str = "items",
             log: Optional[logging.Logger] = None, seconds: float = 30.0):
    """Yield `items`, logging a line every `every` items or `seconds`: count/total, rate and ETA."""
    log = log or logging.getLogger("progress")
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    started = last = time.time()
    count = 0
    for count, item in enumerate(items, 1):
        yield item
        now = time.time()
        if count % every == 0 or now - last >= seconds:
            last = now
            log.info(progress_line(count, total, now - started, what))
    if count:
        log.info(progress_line(count, total, time.time() - started, what))


def progress_line(done: int, total: Optional[int], elapsed: float, what: str) -> str:
    rate = done / elapsed if elapsed > 0 else float("inf")
    head = f"{done}/{total} {what}" if total else f"{done} {what}"
    line = f"{head}, {rate:.1f} {what}/s, {elapsed:.1f}s elapsed"
    if total and rate and done < total:
        line += f", ETA {(total - done) / rate:.0f}s"
    return line
