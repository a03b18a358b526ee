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
- Progress (`Progress`, `progress`): timestamped lines with rate and ETA in the log; in an interactive run (the
  console is a terminal) also a live bar on the terminal, drawn there only (the log keeps plain lines). Libraries'
  own bars (tqdm frames written to stderr) go to that terminal as one live line too, and never into the log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional, TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"


class StageFailed(SystemExit):
    """Raised (as SystemExit(1), or 128 + the signal when stopped) after the traceback went to the log; the console
    has the one-line summary (and no Python traceback)."""


class Stopped(BaseException):
    """The stage got SIGINT (Ctrl-C) or SIGTERM (Snakemake, the job scheduler): raised where the stage is, so that
    what it started stops with it (runtime.launch) and the console gets the stage's one line."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        how = "interrupted" if self.signum == signal.SIGINT else "stopped"
        return f"{how} ({signal.Signals(self.signum).name})"


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_stopped(signum, frame) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise Stopped while the stage runs (main thread only: where Python runs signal handlers)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, _raise_stopped) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def history_path(log_path: Path) -> Path:
    return Path(log_path).parent / "history" / Path(log_path).name


class _Tee:
    """A text stream writing to the run's log and to the history (both appended, line-buffered).

    A library's progress-bar frame (a write holding a bare carriage return: tqdm & co., e.g. Data-Juicer's op bars)
    never reaches the log: it goes to `terminal` (an interactive run's console) or nowhere. The newline a finished bar
    ends with clears the terminal line instead, so third-party bars stay one live line, not a scrolling list."""

    def __init__(self, *paths: Path, terminal: Optional[TextIO] = None):
        self.terminal, self.framed = terminal, False
        self.files = []
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.files.append(open(path, "a", buffering=1, encoding="utf-8", errors="replace"))

    def write(self, text: str) -> int:
        if "\r" in text.replace("\r\n", "\n"):
            self._to_terminal(text)
            self.framed = True
            return len(text)
        if self.framed and text == "\n":
            self.end_frames()
            return len(text)
        for handle in self.files:
            handle.write(text)
        return len(text)

    def _to_terminal(self, text: str) -> None:
        if self.terminal is not None:
            with contextlib.suppress(OSError, ValueError):
                self.terminal.write(text)
                self.terminal.flush()

    def end_frames(self) -> None:
        if self.framed:
            self._to_terminal("\r\x1b[K")  # back to the line start, erase the bar
            self.framed = False

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
    global _console, _stage
    log_path = Path(log_path)
    console = sys.__stderr__
    stream = _Tee(log_path, history_path(log_path),
                  terminal=console if console is not None and console.isatty() else None)
    saved, saved_console, saved_stage, saved_tty = (sys.stdout, sys.stderr), _console, _stage, os.environ.get(TTY_ENV)
    _console, _stage = console, stage
    if console is not None and console.isatty():  # interactive: child processes may draw a bar there too
        with contextlib.suppress(OSError):
            os.environ[TTY_ENV] = os.ttyname(console.fileno())
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
        with _stop_signals_raise():
            yield log
        log.info("%s done in %.1fs", stage, time.time() - started)
    except BaseException as exc:  # noqa: BLE001  (Stopped too: the log says the run was interrupted)
        stream.write(traceback.format_exc())
        summary = str(exc) if isinstance(exc, Stopped) else exception_line(exc)
        log.error("%s failed after %.1fs: %s", stage, time.time() - started, summary)
        stream.end_frames()  # a library's bar may be live on the terminal: the failure line starts a clean line
        console.write(f"[{stage}] FAILED: {summary}  (full log: {log_path})\n")
        console.flush()
        if isinstance(exc, SystemExit):
            raise
        raise StageFailed(128 + exc.signum if isinstance(exc, Stopped) else 1) from None
    finally:
        stream.end_frames()
        stream.flush()
        sys.stdout, sys.stderr = saved
        _console, _stage = saved_console, saved_stage
        if saved_tty is None:
            os.environ.pop(TTY_ENV, None)
        else:
            os.environ[TTY_ENV] = saved_tty
        root.handlers, root.level = saved_handlers, saved_level
        logging.captureWarnings(False)
        stream.close()


def console_line(text: str) -> None:
    """A stage's key result for the user: one line on the console the stage started with (also in the log)."""
    logging.getLogger("console").info(text)
    stream = _console or sys.stderr
    if stream is not sys.stderr:  # outside stage_logging the log line above already went there
        stream.write(text + "\n")
        stream.flush()


def exception_line(exc: BaseException) -> str:
    """`ValueError: loss is nan` (the first line of the message, at most 400 characters), as a traceback ends."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 400:
        first = first[:400] + " ..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _quiet_third_party() -> None:
    """transformers logs through its own handler to the real stderr; point it at ours (the log file). Its bars and
    the hub's ("Loading weights", a download's files) write to our stream, which shows them only on a terminal."""
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


def progress(items: Iterable, *, every: Optional[int] = 100, total: Optional[int] = None, what: str = "items",
             log=None, seconds: float = 30.0, label: Optional[str] = None):
    """Yield `items` under a `Progress` (log line every `every` items or `seconds`; a bar on a terminal)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, what, log=log or logging.getLogger("progress"), every=every, seconds=seconds,
                  label=label) as counter:
        for item in items:
            yield item
            counter.update()


class Progress:
    """Work done in a stage, reported two ways:

    - `log` (a Logger or a callable taking a line): a plain line (done/total, rate, elapsed, ETA, the last `postfix`)
      every `every` units (default: every tenth of `total`), after `seconds` without a line, and at close. Inside
      `stage_logging` these lines are timestamped in the rule's log.
    - a live tqdm bar (done/total, rate, ETA) on the terminal of an interactive run (`terminal()`), never in the log.

        with Progress(len(plan), "tensors", log=log, label="convert") as bar:
            for tensor in plan:
                ...
                bar.update(1, GB=f"{done / 1e9:.2f}")

    `initial` counts work done before this process started (a resumed run): rate and ETA count only the new work.
    `what="B"` formats amounts and rates as bytes (kB, MB, GB).
    """

    def __init__(self, total: Optional[float], what: str = "items", *, log=None, label: Optional[str] = None,
                 initial: float = 0, every: Optional[float] = None, seconds: float = 30.0):
        self.total, self.what, self.label = total, what, label
        self.log = log.info if isinstance(log, logging.Logger) else log
        self.initial = self.done = initial
        self.every = every or (total / 10 if total else 100)
        self.next_line = initial + self.every
        self.seconds = seconds
        self.started = self.last_line = time.monotonic()
        self.postfix: dict = {}
        self.logged_at = None
        self.bar = None
        stream = terminal()
        if stream is not None:
            from tqdm import tqdm

            sized = _columns(stream) > 0  # a terminal that reports no width (some ptys): tqdm would draw nothing
            self.bar = tqdm(total=total, initial=initial, desc=label or _stage, unit=what, file=stream, leave=False,
                            dynamic_ncols=sized, ncols=None if sized else 100, mininterval=0.5,
                            unit_scale=what == "B", unit_divisor=1000)

    def update(self, n: float = 1, **postfix) -> None:
        self.done += n
        if postfix:
            self.postfix = postfix
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        now = time.monotonic()
        if self.log is not None and (self.done >= self.next_line or now - self.last_line >= self.seconds):
            while self.next_line <= self.done:
                self.next_line += self.every
            self._log_line(now)

    def line(self, now: Optional[float] = None) -> str:
        elapsed = (now or time.monotonic()) - self.started
        text = progress_line(self.done, self.total, elapsed, self.what, initial=self.initial)
        if self.postfix:
            text += ", " + ", ".join(f"{key} {value}" for key, value in self.postfix.items())
        return f"{self.label}: {text}" if self.label else text

    def _log_line(self, now: float) -> None:
        self.last_line, self.logged_at = now, self.done
        self.log(self.line(now))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.log is not None and self.logged_at != self.done and self.done > self.initial:
            self._log_line(time.monotonic())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_line(done: float, total: Optional[float], elapsed: float, what: str, initial: float = 0) -> str:
    """`12/40 samples, 3.1 samples/s, 3.9s elapsed, ETA 9s` (bytes: `1.2 GB/4.0 GB, 0.8 GB/s, ...`)."""
    amount = _bytes if what == "B" else (lambda n: f"{n:.0f}" if float(n).is_integer() else f"{n:.1f}")
    rate = (done - initial) / elapsed if elapsed > 0 else float("inf")
    unit = "" if what == "B" else f" {what}"
    head = f"{amount(done)}/{amount(total)}{unit}" if total else f"{amount(done)}{unit}"
    rate_text = f"{_bytes(rate)}/s" if what == "B" else f"{rate:.1f} {what}/s"
    line = f"{head}, {rate_text}, {elapsed:.1f}s elapsed"
    if total and rate and done < total:
        line += f", ETA {(total - done) / rate:.0f}s"
    return line


def _bytes(count: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"


# The terminal of an interactive run. Inside stage_logging sys.stdout/stderr are the log, so the console the stage
# started with is kept here; processes the stage starts (torchrun ranks, whose output is piped into the log) find the
# terminal's device through TTY_ENV, which stage_logging sets only while the console is a terminal.
TTY_ENV = "OMNI_PROGRESS_TTY"
_console: Optional[TextIO] = None
_stage: Optional[str] = None  # the running stage's name: the bar's title when the caller gives none
_tty_file: Optional[TextIO] = None


def _columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


def terminal() -> Optional[TextIO]:
    """Where a live progress bar may be drawn, or None: CI, Slurm, output redirected, ranks other than 0."""
    global _tty_file
    if os.environ.get("RANK", "0") != "0":
        return None
    console = _console or sys.stderr
    if console is not None and console.isatty():
        return console
    path = os.environ.get(TTY_ENV)
    if not path:
        return None
    if _tty_file is None or _tty_file.name != path:
        try:
            _tty_file = open(path, "w", buffering=1)
        except OSError:
            return None
    return _tty_file
