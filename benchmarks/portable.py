"""Paths as a result file records them, so the file reads the same on any machine.

A folder in or beside the repository (the scripts' default data folders sit in ../shared) is written
relative to the repository; a temporary run folder or log under $TMPDIR as `$TMPDIR/...`; anything
else by its name alone, since its absolute place belongs to one machine.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def portable(path: str | os.PathLike) -> str:
    p = Path(os.path.abspath(path))
    tmp = Path(os.path.abspath(tempfile.gettempdir()))
    # The deeper root wins: a checkout inside $TMPDIR (CI's `mktemp -d` clone) still records its own files,
    # and ../shared beside it, relative to the repository.
    inside_repo = p.is_relative_to(REPO.parent) and len(REPO.parent.parts) > len(tmp.parts)
    if p.is_relative_to(tmp) and not inside_repo:
        return f"$TMPDIR/{p.relative_to(tmp).as_posix()}"
    if p.is_relative_to(REPO.parent):
        return Path(os.path.relpath(p, REPO)).as_posix()
    return p.name


def portable_command(args: list[str]) -> str:
    """A command line with each absolute path argument made portable."""
    return " ".join(portable(a) if os.path.isabs(a) else a for a in args)


# Not the `//` of a URL (https://host/path), which is no machine's path.
_ABSOLUTE = re.compile(r"(?<![\w.$/])/(?!/)[^\s'\",;:()\[\]]+")


def portable_tree(value):
    """A result structure with every absolute path inside its strings made portable (commands, log lines)."""
    if isinstance(value, dict):
        return {k: portable_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable_tree(v) for v in value]
    if isinstance(value, str):
        return _ABSOLUTE.sub(lambda m: portable(m.group(0)), value)
    return value
