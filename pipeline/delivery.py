"""Which model a run delivers: the one its bundle ships by default, the runner runs by default and the
report names first. One place for that fact, read from the run directory.

The rule: the variant the accuracy guard delivered (analysis.json's `guard.delivered`, e.g.
int8-cle) when the run has it; otherwise the first present of PREFERENCE. The variants the guard
replaced (`guard.superseded`, e.g. the int8 it repaired) are never the default.
"""
from __future__ import annotations

import json
from pathlib import Path

# Best first for a CPU board: integer-only int8 (a quarter of the size, integer kernels); dynamic
# range (a quarter of the size, float activations); float16 (half the size, runs as fp32); fp32;
# int16x8 last: a quarter of the size, but its reference kernels are ~80x slower than int8's.
PREFERENCE = ("int8", "dynamic", "float16", "fp32", "int16x8")


def guard_decision(run_dir: Path) -> tuple[str | None, list[str]]:
    """(the variant the guard delivered or None, the variants it superseded) from analysis.json."""
    path = Path(run_dir) / "analysis.json"
    try:
        guard = json.loads(path.read_text()).get("guard") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        guard = None
    if not isinstance(guard, dict):
        return None, []
    return guard.get("delivered"), list(guard.get("superseded") or [])


def default_variant(present, delivered: str | None = None, superseded=()) -> str:
    """The default among the variants `present` (see the module's rule)."""
    present = list(present)
    if delivered in present:
        return delivered
    usable = [v for v in present if v not in superseded] or present
    ranked = [v for v in PREFERENCE if v in usable] + [v for v in usable if v not in PREFERENCE]
    return ranked[0]

