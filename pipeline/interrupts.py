"""Ctrl-C, decided in one place: how a command notices it, the line and exit code it ends with, and
why a finished command ignores it.

Ctrl-C inside TensorFlow can come back as an unrelated error (seen: "ValueError: None values not
supported"), so while a command runs under `ctrl_c()` the signal itself is remembered and wins over
whatever exception it turned into (failures.kind asks `signalled()`). A Ctrl-C that lands while a finalizer
runs (TensorFlow frees its functions and tensors in `__del__`, many times an epoch) is swallowed by Python
("Exception ignored in ..."), the likeliest reason a search's final training once went on to epoch 118 after a
Ctrl-C in CI. Every step of a long loop therefore asks `check()` (console's progress does), which raises the lost
one.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

import click


class Interrupted(click.ClickException):
    """Ctrl-C: exit code 130, as a shell reports a command killed by SIGINT."""

    exit_code = 130


class DeployInterrupted(Exception):
    """Ctrl-C during a deploy: every board was stopped and nothing was merged."""


# What an interruption leaves, by command (a build adds the `--resume` line naming its run; a command
# whose line depends on its arguments says it with `leaves`); a finished run being changed stays as it was.
INTERRUPTED = {
    **dict.fromkeys(("build", "train", "convert"), "interrupted; nothing half-written was left behind"),
    **dict.fromkeys(("report", "benchmark", "analyze", "export"), "interrupted; the run is unchanged"),
    "deploy": "interrupted: every board was stopped and nothing was merged into the report",
}
_LEAVES = "edgepipe.interrupted"  # the click context's meta key `leaves` sets

_signalled: list[int] = []


def leaves(message: str) -> None:
    """The line the running command ends with if interrupted from now on (instead of INTERRUPTED's)."""
    click.get_current_context().meta[_LEAVES] = message


def interrupted(command: str, notes: str = "") -> Interrupted:
    ctx = click.get_current_context(silent=True)
    said = ctx.meta.get(_LEAVES) if ctx is not None else None
    return Interrupted((said or INTERRUPTED.get(command, "interrupted")) + notes)


def signalled() -> bool:
    """Was a Ctrl-C received while the command ran under ctrl_c()?"""
    return bool(_signalled)


def _on_sigint(signum, frame):
    _signalled.append(signum)
    raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c():
    """Remember a Ctrl-C while the body runs. A SIGINT ignored by whoever started us (`nohup`, a script's
    background job) stays ignored, and a handler set outside Python (None) stays too."""
    def unraisable(info):
        # The KeyboardInterrupt a finalizer swallowed: check() raises it at the next step, without a traceback.
        if not isinstance(info.exc_value, KeyboardInterrupt):
            hook(info)

    previous, hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    ours = previous not in (signal.SIG_IGN, None)
    _signalled.clear()
    if ours:
        signal.signal(signal.SIGINT, _on_sigint)
        sys.unraisablehook = unraisable
    try:
        yield
    finally:
        if ours:
            signal.signal(signal.SIGINT, previous)
            sys.unraisablehook = hook


def check() -> None:
    """Raise a Ctrl-C received under ctrl_c() that did not stop the command: past the signal, only a swallowed one
    lets a loop reach its next step. Only while ctrl_c()'s handler is the one installed (Tune installs its own for
    its trials; a finished command's is gone), and in the main thread, whose command it stops."""
    if (_signalled and signal.getsignal(signal.SIGINT) is _on_sigint
            and threading.current_thread() is threading.main_thread()):
        raise KeyboardInterrupt


def finished() -> None:
    """Once a command has finished, its outcome stands: a Ctrl-C that lands while Python shuts down
    (TensorFlow's exit handlers take a while) would otherwise kill the process with no message and an
    exit code that says the finished work was interrupted."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
