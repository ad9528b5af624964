"""What went wrong, decided in one place: an interruption, the user's input, the machine, or a bug.

build.py asks before it deletes anything (only the user's input throws a staging folder away); the CLI
asks to choose the exit code and the one line (cli_run.exit_error). A Ctrl-C remembered while a
command runs (interrupts.ctrl_c) wins over whatever exception it turned into.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from pipeline import interrupts

INTERRUPTED, INPUT, MACHINE, BUG = "interrupted", "input", "machine", "bug"

class InputError(Exception):
    """Base of every error that means "your input" (data, files, options, boards), not "our bug". Each
    stage's own error type derives from it, so this module, which every stage reaches, names none of them."""


def user_errors() -> tuple[type, ...]:
    """The exception types that mean 'your input', not 'our bug'."""
    import click

    from device.integrity import DeviceError

    return (click.ClickException, InputError, DeviceError)


def kind(error: BaseException) -> str:
    """INTERRUPTED, INPUT (the user's data, files or options), MACHINE (a full or read-only disk, a link
    loop: `os_problem` says which) or BUG."""
    if interrupts.signalled() or isinstance(error, (KeyboardInterrupt, interrupts.DeployInterrupted)):
        return INTERRUPTED
    if isinstance(error, user_errors()):
        return INPUT
    if machine_problem(error):
        return MACHINE
    return BUG


def machine_problem(error: BaseException) -> str | None:
    """One line for a problem of the machine the user can fix, else None: an OS error (`os_problem`), or
    any error while a disk we write to is full. TensorFlow's converter swallows its own "no space left"
    (it falls back to another path, which then fails with an unrelated TypeError)."""
    explained = os_problem(error)
    if explained or isinstance(error, OSError):
        return explained
    for folder in (tempfile.gettempdir(), os.getcwd()):
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(folder).free
            if free < LOW_SPACE:
                return (f"no space left on the disk that holds {folder} ({free // 1024} KiB free; what ran out of it "
                        f"then failed with {type(error).__name__}: {error}); free some space there (`df -h {folder}`) "
                        "or write somewhere else with --out")
    return None


LOW_SPACE = 1024 * 1024  # a disk with less free than this cannot take a model, a log or a report


def os_problem(error: BaseException) -> str | None:
    """One line for an OS error the user can fix (naming the path and the fix), else None."""
    if isinstance(error, shutil.Error):  # copytree gathers one (source, destination, reason) per file
        for _, dst, why in error.args[0] if error.args and isinstance(error.args[0], list) else ():
            code = re.match(r"\[Errno (\d+)\]", str(why))
            if code:
                return os_problem(OSError(int(code.group(1)), str(why), dst))
        return None
    if not isinstance(error, OSError):
        return None
    path = error.filename or "a file"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the disk that holds {path}; free some space there "
                f"(`df -h {Path(path).parent}`) or write somewhere else with --out")
    if error.errno == errno.EROFS:
        return f"{path} is on a read-only file system; run from a writable folder or pass --out DIR on a writable disk"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {path}; pass --out DIR in a folder you can write, or fix the folder's permissions"
    if error.errno == errno.ELOOP:
        link = _looping_link(str(path))
        if link:
            return (f"{link} is a symbolic link that leads back to {os.path.realpath(link)}, so the folder never "
                    "ends; remove that link or point it elsewhere")
        return f"{path}: too many levels of symbolic links; remove the link that loops"
    return None


def _looping_link(path: str) -> str | None:
    """The first symbolic link on `path` that points at one of its own ancestors (or itself)."""
    parts = Path(path).parts
    for i in range(1, len(parts) + 1):
        prefix = Path(*parts[:i])
        try:
            if not prefix.is_symlink():
                continue
            target = os.path.realpath(prefix)
        except OSError:
            continue
        here = os.path.realpath(prefix.parent)
        if here == target or here.startswith(target.rstrip("/") + "/"):
            return str(prefix)
    return None
