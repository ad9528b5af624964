"""What the benchmarks that run a named series (recipes, screens) share: the names asked for, and the results an
earlier result file keeps, since a series adds to the runs of earlier sessions, whose folders may be gone."""
from __future__ import annotations

import json
from pathlib import Path


def chosen(ap, given: list[str], names, what: str) -> list[str]:
    """The names given on the command line, all of `names` for none; checked here, since argparse refuses an empty
    list against `choices`."""
    if unknown := set(given) - set(names):
        ap.error(f"unknown {what} {', '.join(sorted(unknown))}; choose from {', '.join(names)}")
    return given or list(names)


def kept(path: Path | None) -> dict:
    """The results of an existing result file, each marked as kept from it (a run of this invocation replaces it)."""
    earlier = json.loads(path.read_text())["results"] if path and path.exists() else {}
    return {name: {**r, "kept_from_result_file": True} for name, r in earlier.items()}
