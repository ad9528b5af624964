"""The medians the benchmark scripts quote, each with pyperf's warning when its samples spread widely: a median
of samples whose interquartile range is more than device/timing.py's WIDE_SPREAD_IQR of it is not worth quoting
alone (the machine was busy, or throttling), whether the samples are seconds, bytes or ratios."""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from device.timing import summarize  # noqa: E402


def median(samples, name: str, warnings: list[str]) -> float:
    """The median of `samples`; a wide spread is printed and appended to `warnings`, for the result file."""
    samples = list(samples)
    mid = statistics.median(samples)
    summary = summarize(samples)  # milliseconds of seconds: the ratio of spread to median is the same in any unit
    if len(samples) >= 3 and "warning" in summary:  # summarize judged it by device/timing.py's wide_spread
        share = summary["iqr_ms"] / summary["p50_ms"]
        warning = (f"{name}: wide spread, the interquartile range is {100 * share:.0f}% of the median {mid:.4g} "
                   f"over {len(samples)} samples; run again on a quieter machine before quoting it")
        print(f"warning: {warning}", file=sys.stderr)
        warnings.append(warning)
    return mid
