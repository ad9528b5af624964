"""What a person and a machine read: report.json / .md / .html, notes, plots."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.failures import InputError


class ReportError(InputError):
    """A run directory or device result the report cannot use; the message names the file and what was expected."""


def read_json(path: Path, expected: str):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not readable ({getattr(e, 'strerror', None) or e}); expected {expected}")
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not JSON ({e.msg} at line {e.lineno}); expected {expected}")


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def ms(x) -> str:
    return "-" if x is None else f"{x:.4f}" if x < 1 else f"{x:.3f}" if x < 100 else f"{x:.1f}"
