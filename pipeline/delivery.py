"""Which model a run delivers: the one its bundle ships by default, the runner runs by default and the
report names first. One place for that fact, read from the run directory.

The rule: the variant the accuracy guard delivered (analysis.json's `guard.delivered`, e.g.
int8-cle) when the run has it; otherwise the first present of PREFERENCE. The variants the guard
replaced (`guard.superseded`, e.g. the int8 it repaired) are never the default. When the guard
rejected int8 and no remedy met the budget, it delivers fp32 and int8 and its remedies are superseded.

It fails closed: a guard record that cannot be read (damaged, truncated, or listed in the manifest
but gone) is an error, never "no decision", because no decision means int8, which may be exactly
the model the guard rejected.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.artifacts import MANIFEST, RunDirError, is_staging, read_manifest

ANALYSIS = "analysis.json"

# Best first for a CPU board: integer-only int8 (a quarter of the size, integer kernels); dynamic
# range (a quarter of the size, float activations); float16 (half the size, runs as fp32); fp32;
# int16x8 last: a quarter of the size, but its reference kernels are ~80x slower than int8's.
PREFERENCE = ("int8", "dynamic", "float16", "fp32", "int16x8")


class GuardRecordError(RunDirError):
    """The accuracy guard's record of a run cannot be read, so nothing may be delivered from it."""


def guard_decision(run_dir: Path) -> tuple[str | None, list[str]]:
    """(the variant the guard delivered or None, the variants it superseded) from analysis.json; fp32 when the
    guard rejected int8 and no remedy met the budget.

    (None, []) only when the guard did not run (no analysis.json, and the manifest lists none; in a build's
    staging folder, whose manifest has no file table yet, no analysis.json) or ran and changed nothing
    (`guard` is null); anything else unreadable raises GuardRecordError."""
    run_dir = Path(run_dir)
    path = run_dir / ANALYSIS
    if not path.is_file():
        if is_staging(run_dir):
            return None, []
        manifest, problem = read_manifest(run_dir)
        if problem and (run_dir / MANIFEST).exists():
            # A damaged manifest cannot say whether the guard ran and its record was lost.
            raise GuardRecordError(
                f"{run_dir}: {problem}, so whether the accuracy guard ran cannot be told; no model is delivered "
                f"from it (it may be the int8 the guard rejected); restore {MANIFEST} from a copy of the run, or "
                "rebuild the run with `pipeline build --overwrite`")
        if manifest and ANALYSIS in manifest["files"]:
            raise _damaged(run_dir, "missing, though the run's manifest.json lists it")
        return None, []
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _damaged(run_dir, f"not readable JSON: {e}") from None
    if not isinstance(doc, dict) or "guard" not in doc:
        raise _damaged(run_dir, "it has no 'guard' entry")
    guard = doc["guard"]
    if guard is None:
        return None, []
    delivered = guard.get("delivered", ...) if isinstance(guard, dict) else ...
    superseded = guard.get("superseded") if isinstance(guard, dict) else None
    if not (delivered is None or isinstance(delivered, str)) or not isinstance(superseded, list) \
            or not all(isinstance(v, str) for v in superseded):
        raise _damaged(run_dir, "its 'guard' entry lacks the delivered and superseded variants")
    if delivered is None and guard.get("needed"):
        # The guard rejected int8 and no remedy met the budget: its record names nothing superseded, and
        # "no decision" would mean int8. fp32, the reference every drop is measured from, is what meets it.
        return "fp32", list(dict.fromkeys(["int8", *superseded, *guard.get("written", [])]))
    return delivered, list(superseded)


def _damaged(run_dir: Path, why: str) -> GuardRecordError:
    return GuardRecordError(
        f"{run_dir / ANALYSIS}: {why}; without the accuracy guard's decision no model is delivered from "
        f"{run_dir} (it may be the int8 the guard rejected); restore {ANALYSIS} from a copy of the run, or "
        "rebuild the run with `pipeline build --overwrite`")


def default_variant(present, delivered: str | None = None, superseded=()) -> str:
    """The default among the variants `present` (see the module's rule)."""
    present = list(present)
    if delivered in present:
        return delivered
    usable = [v for v in present if v not in superseded] or present
    ranked = [v for v in PREFERENCE if v in usable] + [v for v in usable if v not in PREFERENCE]
    return ranked[0]
