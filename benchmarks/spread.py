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
from device.timing import WIDE_SPREAD_IQR  # noqa: E402


def median(samples, name: str, warnings: list[str]) -> float:
    """The median of `samples`; a wide spread is printed and appended to `warnings`, for the result file."""
    samples = list(samples)
    mid = statistics.median(samples)
    if len(samples) >= 3 and mid > 0:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        if (q3 - q1) / mid > WIDE_SPREAD_IQR:
            warning = (f"{name}: wide spread, the interquartile range is {100 * (q3 - q1) / mid:.0f}% of the median "
                       f"{mid:.4g} over {len(samples)} samples; run again on a quieter machine before quoting it")
            print(f"warning: {warning}", file=sys.stderr)
            warnings.append(warning)
    return mid
