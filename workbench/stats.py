"""Timing statistics: a median with a confidence interval, a relative spread, and the overlap test.

The interval is distribution-free: the order statistics x(l) <= median <= x(u) chosen from the
binomial(n, 1/2) law so that [x(l), x(u)] covers the true median with at least CONFIDENCE when
n allows it (n >= 6 for 95%); with fewer repeats it is min..max, whose coverage is 1 - 2^(1-n)
(75% for 3 repeats, 94% for 5), and `coverage` says so. No randomness: the same repeats always
give the same interval.

Records written before intervals existed still work: `interval(record)` uses `ci_ms` if the
record has one, else the interval of its `repeats_ms`, else the bare median (a point).
"""

from __future__ import annotations

import math

CONFIDENCE = 0.95
SPREAD_LIMIT = 0.10  # relative interval width above which a measurement is measured again
EXTRA_ROUNDS = 2  # at most this many extra rounds of repeats for a wide measurement


def _coverage(n: int, k: int) -> float:
    """P(x(k) <= median <= x(n-k+1)) for n samples (k is 1-based): 1 - 2 P(Binomial(n, 1/2) < k)."""
    tail = sum(math.comb(n, i) for i in range(k)) / 2 ** n
    return 1.0 - 2.0 * tail


def median_ci(samples, confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(median, lo, hi, coverage) of `samples`; lo..hi is the order-statistic interval."""
    values = sorted(float(v) for v in samples)
    n = len(values)
    if n == 0:
        raise ValueError("no samples")
    mid = n // 2
    median = values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2
    k = 1  # the widest interval (min..max); narrowed while the coverage stays above `confidence`
    while k + 1 <= (n + 1) // 2 and _coverage(n, k + 1) >= confidence:
        k += 1
    return median, values[k - 1], values[n - k], _coverage(n, k)


def spread(lo: float, hi: float, median: float) -> float:
    """The interval's width relative to the median (0 for a point)."""
    return (hi - lo) / median if median else 0.0


def summarize(samples) -> dict:
    """The statistics a record carries: median_ms, ci_ms [lo, hi], ci_coverage, spread."""
    median, lo, hi, coverage = median_ci(samples)
    return {"median_ms": median, "ci_ms": [lo, hi], "ci_coverage": round(coverage, 4),
            "spread": spread(lo, hi, median)}


def interval(record: dict) -> tuple[float, float] | None:
    """A record's interval in ms: its `ci_ms`, else from its `repeats_ms`, else the median as a point."""
    ci = record.get("ci_ms")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        return float(ci[0]), float(ci[1])
    repeats = [r for r in record.get("repeats_ms") or [] if isinstance(r, (int, float)) and math.isfinite(r)]
    if repeats:
        _, lo, hi, _ = median_ci(repeats)
        return lo, hi
    median = record.get("median_ms")
    return (float(median), float(median)) if isinstance(median, (int, float)) else None


def overlap(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    """Whether two intervals share a point (a missing interval overlaps nothing)."""
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def clearly_below(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """a is faster than b beyond noise: a's whole interval lies below b's."""
    return a[1] < b[0]


def sum_interval(intervals) -> tuple[float, float]:
    """The interval of a sum of independent times (conservative: lows summed, highs summed)."""
    intervals = list(intervals)
    return sum(i[0] for i in intervals), sum(i[1] for i in intervals)


def show(record: dict, digits: int = 3) -> str:
    """'4.10 ms [4.02, 4.31]' for a record (its median and interval)."""
    median, ci = record.get("median_ms"), interval(record)
    if median is None:
        return "-"
    text = f"{median:.{digits}g} ms"
    return text + (f" [{ci[0]:.{digits}g}, {ci[1]:.{digits}g}]" if ci and ci[0] != ci[1] else "")


def same_runoff(records: list[dict]) -> bool:
    """Records of one runoff (runoff.py): timed in the same interleaved rounds, comparable round by round."""
    rounds = {len(r.get("repeats_ms") or []) for r in records}
    return (len(records) > 1 and all(r.get("runoff") for r in records) and len(rounds) == 1 and min(rounds) > 1
            and len({tuple(r.get("contenders") or ()) for r in records}) == 1)


# A kernel less than this much slower round by round is not worth a different plan: a tie.
RUNOFF_MARGIN = 0.02


def slower_in_rounds(record: dict, other: dict) -> bool:
    """Of two records of one runoff: the interval of the median per-round ratio record/other lies above
    1 + RUNOFF_MARGIN. A slow spell of the machine slows both in the rounds it covers: it cancels in the ratio."""
    ratios = [a / b for a, b in zip(record["repeats_ms"], other["repeats_ms"]) if b > 0]
    return bool(ratios) and median_ci(ratios)[1] > 1.0 + RUNOFF_MARGIN
