"""Paths as a result file records them, so the file reads the same on any machine.

A folder in or beside the repository (the scripts' default data folders sit in ../shared) is written
relative to the repository; a temporary run folder or log under $TMPDIR as `$TMPDIR/...`; anything
else by its name alone, since its absolute place belongs to one machine.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def portable(path: str | os.PathLike) -> str:
    p = Path(os.path.abspath(path))
    tmp = Path(os.path.abspath(tempfile.gettempdir()))
    if p.is_relative_to(tmp):
        return f"$TMPDIR/{p.relative_to(tmp).as_posix()}"
    if p.is_relative_to(REPO.parent):
        return Path(os.path.relpath(p, REPO)).as_posix()
    return p.name


def portable_command(args: list[str]) -> str:
    """A command line with each absolute path argument made portable."""
    return " ".join(portable(a) if os.path.isabs(a) else a for a in args)
