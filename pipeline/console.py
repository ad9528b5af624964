"""What a person sees while a build runs: edgepipe's own lines and progress, nothing else.

TensorFlow, its converter and the LiteRT interpreter write their own log lines from C++ straight to
file descriptors 1 and 2 (absl's "WARNING: All log messages before absl::InitializeLog()", oneDNN,
CUDA probing, "fully_quantize: 0, ...", "Created TensorFlow Lite XNNPACK delegate"); Python-level
redirection cannot catch those. A `session` therefore points fds 1 and 2 at a pipe for the whole
command. A reader thread copies everything that arrives into `build.log`, and with `--verbose` to
the terminal as well. edgepipe's own lines go to a saved copy of the real terminal and into the log.
TF_CPP_MIN_LOG_LEVEL is left alone on purpose: the native lines belong in the log when something
goes wrong, and the pipe already keeps them off the screen.

Progress uses rich (already installed with Keras 3): live bars with an ETA on a terminal, drawn
below our lines so neither tears the other; on a pipe, a CI log or TERM=dumb, one plain line per
finished stage and no control characters at all.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from pipeline import interrupts

LOG_NAME = "build.log"

_active: Session | None = None


def _stamp() -> str:
    return time.strftime("%H:%M:%S")


class Session:
    """fds 1/2 captured into a log; `say` and `progress` reach the real terminal."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.log_path = Path(tempfile.gettempdir()) / f"edgepipe-{os.getpid()}-{int(time.time())}.log"
        self.final: Path | None = None
        self._lock = threading.Lock()
        self.log_failed: OSError | None = None
        self._log = open(self.log_path, "w+", encoding="utf-8", errors="replace")
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        if _is_fd1(sys.stdout):
            self.term = os.fdopen(os.dup(self._saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
        else:  # stdout was replaced in Python (click's CliRunner, a notebook): our lines go where it points
            self.term = sys.stdout
        self.live = self.term.isatty() and os.environ.get("TERM", "") not in ("", "dumb")
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._reader = threading.Thread(target=self._copy_native, args=(read_end,), daemon=True)
        self._reader.start()
        self._progress = None
        if self.live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._rich = Console(file=self.term, highlight=False)
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                      TimeRemainingColumn(), console=self._rich, transient=True)
            self._progress.start()

    def _copy_native(self, fd: int) -> None:
        # Drains the pipe whatever happens to the log or the terminal: a full pipe would block TensorFlow
        # in the middle of a write and hang the command, where a full disk must end it in one line.
        with os.fdopen(fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                text = chunk.decode("utf-8", "replace")
                self._write_log(text)
                if self.verbose:
                    with contextlib.suppress(OSError, ValueError):
                        self._to_terminal(text.rstrip("\n"))

    def _write_log(self, text: str) -> None:
        """Append to the log; once the disk under it is full, the log stops and the command goes on (the
        command's own writes meet the same disk and say so)."""
        with self._lock:
            if self._log.closed or self.log_failed:
                return
            try:
                self._log.write(text)
                self._log.flush()
            except OSError as e:
                e.filename = e.filename or str(self.log_path)
                self.log_failed = e

    def _to_terminal(self, text: str) -> None:
        if self._progress is not None:
            self._rich.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self.term.write(text + "\n")

    def say(self, line: str) -> None:
        """One of edgepipe's own lines: on the terminal and, time-stamped, in the log."""
        line = str(line)
        if self._log.closed:  # a straggler after the command ended (an interrupted stage's finalizer)
            return
        self._write_log(f"[edgepipe {_stamp()}] {line}\n")
        self._to_terminal(line)

    def keep_log(self, folder: Path, final: Path | None = None) -> None:
        """From now on the log lives in folder/build.log (the run's staging folder, renamed to `final`)."""
        new = Path(folder) / LOG_NAME
        with self._lock:
            self._log.flush()
            self._log.seek(0)
            with open(new, "a", encoding="utf-8") as f:
                shutil.copyfileobj(self._log, f)
            self._log.close()
            if self.log_path.parent == Path(tempfile.gettempdir()):
                self.log_path.unlink(missing_ok=True)
            self._log = open(new, "a+", encoding="utf-8", errors="replace")
            self.log_failed = None  # a new file, perhaps on another disk
            self.log_path, self.final = new, (Path(final) / LOG_NAME if final else None)

    def log_moved(self, path: Path | None) -> None:
        """The log file was renamed (the open handle follows it) and no longer goes with a run."""
        with self._lock:
            if path is not None:
                self.log_path = Path(path)
            self.final = None

    def where(self) -> Path:
        """The log's current path (the staging folder is renamed into the run directory on success)."""
        if self.final is not None and self.final.exists() and not self.log_path.exists():
            return self.final
        return self.log_path

    def close(self, failed: BaseException | None) -> None:
        if self._progress is not None:
            self._progress.stop()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        self._reader.join(timeout=5)  # a child still holding the pipe must not hang the exit
        for fd in self._saved:
            os.close(fd)
        if failed is not None:
            self._write_log(f"[edgepipe {_stamp()}] failed:\n"
                            + "".join(traceback.format_exception(type(failed), failed, failed.__traceback__)))
        with self._lock, contextlib.suppress(OSError):  # what a full disk kept in the buffer is lost
            self._log.close()
        if self.term is not sys.stdout:
            self.term.close()


def _is_fd1(stream) -> bool:
    try:
        return stream.fileno() == 1
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is both
        return False


class Progress:
    """A stage's progress: a live bar on a terminal, one line when it ends elsewhere, nothing outside a session."""

    def __init__(self, session: Session | None, description: str, total: int | None, unit: str):
        self.session, self.total, self.unit = session, total, unit
        self.title = self.description = description
        self.done, self._t0, self._task = 0, time.perf_counter(), None
        if session is not None and session._progress is not None:
            self._task = session._progress.add_task(description, total=total, unit=unit)

    def advance(self, n: int = 1, description: str | None = None) -> None:
        interrupts.check()  # a Ctrl-C a finalizer swallowed stops the loop here
        self.done += n
        if description:
            self.description = description
        if self._task is not None:
            self.session._progress.update(self._task, advance=n, description=self.description)

    def finish(self) -> None:
        if self._task is not None:
            self.session._progress.remove_task(self._task)
        elif self.session is not None:
            of = f"/{self.total:,}" if self.total else ""
            self.session.say(f"{self.title}: {self.done:,}{of} {self.unit} in "
                             f"{time.perf_counter() - self._t0:.1f} s")


@contextlib.contextmanager
def progress(description: str, total: int | None = None, unit: str = "steps"):
    """`with progress("evaluating", total=n, unit="variants") as p: ... p.advance()`"""
    p = Progress(_active, description, total, unit)
    try:
        yield p
    finally:
        p.finish()


def say(line: str) -> None:
    """edgepipe's own line: through the session when one is open, else plain print."""
    if _active is not None:
        _active.say(line)
    else:
        print(line, flush=True)


def log_moved(path: Path | None) -> None:
    if _active is not None:
        _active.log_moved(path)


def keep_log(folder: Path, final: Path | None = None) -> None:
    if _active is not None:
        _active.keep_log(folder, final)


@contextlib.contextmanager
def session(verbose: bool = False):
    """Capture native output for the duration of one command; yields the Session.

    A log that never reached a run folder is deleted unless a bug needs it read: then the exception
    gets a note naming it, which ends the command's one line. Any other failure's line says everything.
    """
    from pipeline import failures

    global _active
    if _active is not None:  # nested: the outer session already captures
        yield _active
        return
    _active = Session(verbose)
    failed = None
    try:
        yield _active
    except BaseException as e:
        failed = e
        raise
    finally:
        s, _active = _active, None
        s.close(failed)
        bug = failed is not None and failures.kind(failed) == failures.BUG
        if bug and s.log_failed:
            failed.add_note(f"no log: {failures.machine_problem(s.log_failed) or s.log_failed}")
        elif bug:
            failed.add_note(f"the traceback and TensorFlow's own output are in {s.where()}")
        if (not bug or s.log_failed) and s.final is None:
            s.log_path.unlink(missing_ok=True)


def keras_callback(epochs: int, steps_per_epoch: int, first_epoch: int = 0):
    """Keras progress as a step bar with an ETA (train.py logs each epoch's line with its throughput)."""
    import keras

    class _Progress(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            # Not the context manager: Keras skips on_train_end when interrupted, and a generator left
            # open would report from its finalizer long after the session closed.
            self.bar = Progress(_active, f"training epoch {first_epoch + 1}/{epochs}",
                                total=(epochs - first_epoch) * steps_per_epoch, unit="steps")

        def on_epoch_begin(self, epoch, logs=None):
            self.bar.advance(0, description=f"training epoch {epoch + 1}/{epochs}")

        def on_train_batch_end(self, batch, logs=None):
            self.bar.advance()

        def on_train_end(self, logs=None):
            self.bar.finish()

    return _Progress()
