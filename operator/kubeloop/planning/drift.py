"""Drift statistics from histograms: a served window's bucket counts against a reference.

Pure: no I/O, no clock, stdlib only (the operator image has neither numpy nor scipy). The cost
of one comparison is the number of buckets, whatever the traffic.

**Buckets.** A :class:`Reference` is a list of bucket ``fractions``; its first ``len(edges) - 1``
buckets are the value buckets in edge order, any bucket after them (the missing-value bucket) has
no position on the value axis. The served side is a count per bucket in the same order (the
runtime's ``increase()`` of ``kubeloop_feature_bucket_total`` over the window; floats are fine).
A missing-value bucket is compared like any other by psi, kl, js and chisquare, and by ks as the
last step of the CDF; wasserstein needs positions, so it compares the value buckets only, each
side renormalised over them (its ``n`` is the served count of present values).

**Statistics** (p: reference fraction, q: served fraction, c: served count, n = sum of c):

- ``psi``: sum (q - p) ln(q / p).  ``kl``: KL(reference || served) = sum p ln(p / q).
- ``js``: the Jensen-Shannon *distance* (natural log; the square root of the divergence, as
  ``scipy.spatial.distance.jensenshannon`` and Evidently report it); at most sqrt(ln 2).
- ``ks``: max |F_ref - F_served| over the binned CDFs.
- ``wasserstein``: W1 between the binned distributions placed at the bucket midpoints (the outer
  buckets hold clipped values; their midpoints are those of their edges), divided by the
  reference's spread: its standard deviation over those midpoints (Evidently divides by the
  reference's std too, so its thresholds carry over). A zero spread (all mass in one bucket)
  falls back to the mean bucket width, then to 1.
- ``chisquare``: Pearson's X^2 = sum (c - n p)^2 / (n p), as ``scipy.stats.chisquare`` gives it,
  with its p-value on populated reference buckets - 1 degrees of freedom. Thresholds apply to
  X^2 like to every other value (breach when above); ``auto`` is its (1 - false_alarm) quantile
  at n, i.e. the chi-square test at significance ``false_alarm``.

**Empty buckets.** A bucket empty on both sides contributes nothing. Where only the served side
is empty, q is taken as half a count, 0.5 / n (a window of n rows cannot resolve less; a fixed
epsilon would make one empty bucket of a small window look like a landslide); where only the
reference is empty, p is taken as ``EPSILON`` (1e-4). js needs neither. With no empty bucket
every value equals scipy's and Evidently's on the same buckets.

Prediction drift is the same comparison, of the served prediction histogram against the
ModelVersion's ``predictionReference`` (validation-time scores, edges shared by all versions).

**Sample size.** Each signal has a minimum count (``min_count``, default ``DEFAULT_MIN_COUNT``);
below it the verdict is inconclusive: its value is recorded but it is never a breach nor a pass.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from typing import Final, Literal

Statistic = Literal["psi", "kl", "js", "ks", "wasserstein", "chisquare"]
Outcome = Literal["breach", "pass", "inconclusive"]
STATISTICS: Final[tuple[Statistic, ...]] = ("psi", "kl", "js", "ks", "wasserstein", "chisquare")

EPSILON: Final = 1e-4  # a reference fraction of zero, where served rows land in that bucket
DEFAULT_MIN_COUNT: Final = 100
DEFAULT_FALSE_ALARM: Final = 0.01
SIMULATION_DRAWS: Final = 4000
# Expected count in the smallest populated bucket from which the chi-square limit is used.
ASYMPTOTIC_MIN_EXPECTED: Final = 1000.0
# ks and wasserstein: the 1/sqrt(n) limit, simulated once at the larger n, from the smaller.
_DISTANCE_LIMIT_ROWS: Final = 10_000
_DISTANCE_LIMIT_FROM: Final = 100.0
_TAIL_POINTS: Final = 40  # largest simulated values the tail estimate rests on
_Z95: Final = 1.6449  # one-sided 95 % normal quantile
# Null quantiles shrink like n**-k: k = 1 for the divergences, 1/2 for the distances, 0 for X^2.
_N_EXPONENT: Final[dict[str, float]] = {
    "psi": 1.0, "kl": 1.0, "js": 0.5, "ks": 0.5, "wasserstein": 0.5, "chisquare": 0.0,
}  # fmt: skip
# Null distribution depends on the fractions only as a multiset: buckets may be reordered.
_PERMUTATION_INVARIANT: Final = frozenset({"psi", "kl", "js", "chisquare"})


@dataclass(frozen=True, slots=True)
class Reference:
    """A reference histogram with what every comparison needs precomputed. Build with :meth:`of`."""

    fractions: tuple[float, ...]  # normalised to sum 1
    placed: int  # value buckets (the first ``placed``); the rest have no position
    gaps: tuple[float, ...]  # midpoint distances / spread, between consecutive value buckets
    spread: float
    rows: float | None  # training rows the fractions were counted from; None: exact
    _floored: tuple[float, ...]
    _log_floored: tuple[float, ...]
    _p_log_p: float  # sum p ln p, for js
    _cdf: tuple[float, ...]  # all buckets, last one left out
    _placed_cdf: tuple[float, ...]  # value buckets renormalised, last one left out

    @classmethod
    def of(
        cls, fractions: Sequence[float], edges: Sequence[float] = (), *, rows: float | None = None
    ) -> Reference:
        """``fractions`` per bucket (normalised here); ``edges`` ascending, one more than the value
        buckets (none: no positions, which only wasserstein needs); ``rows``: how many training
        rows the fractions were counted from, which :func:`auto_threshold` allows for (a reference
        is a sample too); None takes the fractions as exact."""
        if rows is not None and not (math.isfinite(rows) and rows > 0):
            raise ValueError(f"reference rows {rows}: expected a count > 0, or None")
        p = [float(f) for f in fractions]
        if not p or any(not math.isfinite(f) or f < 0 for f in p) or sum(p) <= 0:
            raise ValueError(
                f"reference fractions {p[:8]}: expected at least one bucket, each a finite "
                "fraction >= 0, with a positive sum"
            )
        e = [float(x) for x in edges]
        if e and (
            len(e) < 2
            or len(e) - 1 > len(p)
            or any(not math.isfinite(x) for x in e)
            or any(b < a for a, b in pairwise(e))
        ):
            raise ValueError(
                f"reference edges {e[:8]} for {len(p)} buckets: expected 2..{len(p) + 1} finite "
                "ascending edges (one more than the value buckets)"
            )
        total = sum(p)
        p = [f / total for f in p]
        placed = len(e) - 1 if e else len(p)
        gaps: tuple[float, ...] = ()
        spread = 1.0
        placed_cdf: tuple[float, ...] = ()
        if e:
            mids = [(a + b) / 2 for a, b in pairwise(e)]
            mass = sum(p[:placed])
            pv = [f / mass for f in p[:placed]] if mass > 0 else [1.0 / placed] * placed
            mean = sum(w * x for w, x in zip(pv, mids, strict=True))
            std = math.sqrt(sum(w * (x - mean) ** 2 for w, x in zip(pv, mids, strict=True)))
            spread = std if std > 0 else ((e[-1] - e[0]) / placed or 1.0)
            gaps = tuple((b - a) / spread for a, b in pairwise(mids))
            placed_cdf = _cumulative(pv)
        return cls._build(tuple(p), placed, gaps, spread, placed_cdf, rows=rows)

    @classmethod
    def _build(
        cls,
        p: tuple[float, ...],
        placed: int,
        gaps: tuple[float, ...],
        spread: float,
        placed_cdf: tuple[float, ...],
        *,
        rows: float | None = None,
    ) -> Reference:
        floored = tuple(f if f > 0 else EPSILON for f in p)
        return cls(
            fractions=p,
            placed=placed,
            gaps=gaps,
            spread=spread,
            rows=rows,
            _floored=floored,
            _log_floored=tuple(math.log(f) for f in floored),
            _p_log_p=sum(f * math.log(f) for f in p if f > 0),
            _cdf=_cumulative(p),
            _placed_cdf=placed_cdf,
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    """One statistic of one window. ``value`` is None only where nothing could be computed
    (no served rows); below ``min_count`` it is recorded but not ``conclusive``."""

    statistic: Statistic
    value: float | None
    n: float
    min_count: float
    conclusive: bool
    p_value: float | None = None  # chisquare only

    def outcome(self, threshold: float) -> Outcome:
        """Breach when the value is above ``threshold``; never a breach nor a pass when
        inconclusive."""
        if not self.conclusive or self.value is None:
            return "inconclusive"
        return "breach" if self.value > threshold else "pass"


def compare(
    reference: Reference | Sequence[float],
    served_counts: Sequence[float],
    *,
    statistic: Statistic,
    min_count: float = DEFAULT_MIN_COUNT,
) -> Verdict:
    """The ``statistic`` of the served window against the reference (see the module docstring)."""
    ref = reference if isinstance(reference, Reference) else Reference.of(reference)
    counts = [float(c) for c in served_counts]
    if len(counts) != len(ref.fractions) or any(not math.isfinite(c) or c < 0 for c in counts):
        raise ValueError(
            f"served counts {counts[:8]}: expected {len(ref.fractions)} finite counts >= 0, "
            "one per reference bucket"
        )
    if statistic not in _STATISTIC_FUNCTIONS:
        raise ValueError(f"statistic {statistic!r}: expected one of {', '.join(STATISTICS)}")
    if statistic == "wasserstein":
        if len(ref.gaps) != ref.placed - 1:
            raise ValueError("wasserstein needs the reference's edges (Reference.of(..., edges))")
        n = sum(counts[: ref.placed])
    else:
        n = sum(counts)
    value = _STATISTIC_FUNCTIONS[statistic](ref, counts, n) if n > 0 else None
    p_value = None
    if statistic == "chisquare" and value is not None:
        df = sum(1 for f in ref.fractions if f > 0) - 1
        p_value = chi2_sf(value, df) if df > 0 else 1.0
    return Verdict(statistic, value, n, float(min_count), n >= min_count and n > 0, p_value)


def _psi(ref: Reference, counts: Sequence[float], n: float) -> float:
    half = 0.5 / n
    total = 0.0
    for c, p, lp, pf in zip(counts, ref.fractions, ref._log_floored, ref._floored, strict=True):
        if c > 0:
            q = c / n
        elif p > 0:
            q = half
        else:
            continue
        total += (q - pf) * (math.log(q) - lp)
    return total


def _kl(ref: Reference, counts: Sequence[float], n: float) -> float:
    half = 0.5 / n
    total = 0.0
    for c, p, lp in zip(counts, ref.fractions, ref._log_floored, strict=True):
        if p > 0:
            total += p * (lp - math.log(c / n if c > 0 else half))
    return total


def _js(ref: Reference, counts: Sequence[float], n: float) -> float:
    # 2 JS = sum p ln p + sum q ln q - sum (p + q) ln m, with m = (p + q) / 2.
    total = ref._p_log_p
    for c, p in zip(counts, ref.fractions, strict=True):
        q = c / n
        if q > 0:
            total += q * math.log(q)
        if p + q > 0:
            total -= (p + q) * math.log((p + q) / 2)
    return math.sqrt(max(total / 2, 0.0))


def _ks(ref: Reference, counts: Sequence[float], n: float) -> float:
    served = 0.0
    worst = 0.0
    for c, f in zip(counts, ref._cdf, strict=False):
        served += c
        worst = max(worst, abs(served / n - f))
    return worst


def _wasserstein(ref: Reference, counts: Sequence[float], n: float) -> float:
    served = 0.0
    total = 0.0
    for c, f, gap in zip(counts, ref._placed_cdf, ref.gaps, strict=False):
        served += c
        total += abs(served / n - f) * gap
    return total


def _chisquare(ref: Reference, counts: Sequence[float], n: float) -> float:
    total = 0.0
    for c, p, pf in zip(counts, ref.fractions, ref._floored, strict=True):
        if c > 0 or p > 0:
            expected = n * pf
            total += (c - expected) ** 2 / expected
    return total


_STATISTIC_FUNCTIONS: Final = {
    "psi": _psi, "kl": _kl, "js": _js, "ks": _ks, "wasserstein": _wasserstein,
    "chisquare": _chisquare,
}  # fmt: skip


# --- Several features ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorstFeature:
    """``feature: "*"``: the conclusive feature furthest above (or nearest to) its threshold."""

    feature: str | None
    verdict: Verdict | None
    threshold: float | None
    outcome: Outcome
    inconclusive: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DriftedShare:
    """The share of drifted features among the conclusive ones, and what it decides."""

    share: float | None
    drifted: tuple[str, ...]
    conclusive: int
    total: int
    outcome: Outcome


def _thresholds(
    verdicts: Mapping[str, Verdict], thresholds: Mapping[str, float] | float
) -> dict[str, float]:
    out = {
        name: float(thresholds if isinstance(thresholds, int | float) else thresholds[name])
        for name in verdicts
    }
    bad = {name: t for name, t in out.items() if not t > 0}
    if bad:
        raise ValueError(f"thresholds {bad}: expected a number > 0 for every feature")
    return out


def worst_feature(
    verdicts: Mapping[str, Verdict], thresholds: Mapping[str, float] | float
) -> WorstFeature:
    """The feature with the largest value / threshold. A breach where any conclusive feature
    breaches; a pass only where every feature is conclusive and none breaches; else inconclusive.
    With ``auto`` thresholds, calibrate each at :func:`per_feature_false_alarm` so that the rule
    as a whole keeps its false-alarm rate."""
    limits = _thresholds(verdicts, thresholds)
    inconclusive = tuple(
        name for name, v in verdicts.items() if v.outcome(limits[name]) == "inconclusive"
    )
    ranked = [
        (v.value / limits[name], name)
        for name, v in verdicts.items()
        if name not in inconclusive and v.value is not None
    ]
    if not ranked:
        return WorstFeature(None, None, None, "inconclusive", inconclusive)
    margin, name = max(ranked)
    if margin > 1:
        outcome: Outcome = "breach"
    else:
        outcome = "inconclusive" if inconclusive else "pass"
    return WorstFeature(name, verdicts[name], limits[name], outcome, inconclusive)


def share_drifted(
    verdicts: Mapping[str, Verdict], thresholds: Mapping[str, float] | float, *, share: float
) -> DriftedShare:
    """Breach where drifted features make at least ``share`` of all features, whatever the
    inconclusive ones would say; a pass where they stay below it even if every inconclusive one
    had drifted; else inconclusive. (Evidently's dataset drift, with drift_share 0.5.)"""
    if not 0 < share <= 1:
        raise ValueError(f"share {share}: expected a fraction in (0, 1]")
    limits = _thresholds(verdicts, thresholds)
    outcomes = {name: v.outcome(limits[name]) for name, v in verdicts.items()}
    drifted = tuple(name for name, o in outcomes.items() if o == "breach")
    undecided = sum(1 for o in outcomes.values() if o == "inconclusive")
    total = len(outcomes)
    conclusive = total - undecided
    if total and len(drifted) >= share * total:
        outcome: Outcome = "breach"
    elif total and len(drifted) + undecided < share * total:
        outcome = "pass"
    else:
        outcome = "inconclusive"
    return DriftedShare(
        len(drifted) / conclusive if conclusive else None, drifted, conclusive, total, outcome
    )


def per_feature_false_alarm(false_alarm: float, features: int) -> float:
    """Šidák: the per-feature rate at which ``features`` independent features together raise
    ``false_alarm``; dependent features raise fewer."""
    return 1.0 - math.pow(1.0 - false_alarm, 1.0 / max(features, 1))


# --- threshold: auto ------------------------------------------------------------------------


def auto_threshold(
    reference: Reference | Sequence[float],
    n: float,
    statistic: Statistic,
    *,
    false_alarm: float = DEFAULT_FALSE_ALARM,
) -> float:
    """The (1 - ``false_alarm``) quantile of ``statistic`` for a window of ``n`` rows drawn from
    the reference's distribution, so a stream without drift breaches at most ``false_alarm`` of
    its evaluations. ``n`` is the verdict's (for wasserstein: the present values).

    - The reference is a sample too: counted from m rows (``Reference.rows``), q - p varies as
      p(1 - p)(1/n + 1/m), so the window counts as n m / (n + m) rows (the DESIGN's PSI ~
      (1/n + 1/m) chi2(B - 1)). Without it, at n = m half the stable features would breach.
    - Analytic where the chi-square limit holds: psi, kl, js and chisquare are, to second order,
      Pearson's X^2 / n (X^2 / 2n for kl, X^2 / 8n for the js divergence), and X^2 tends to
      chi2(B - 1) for B populated buckets. Used where every populated bucket expects at least
      ``ASYMPTOTIC_MIN_EXPECTED`` rows; below that the limit is optimistic (10 equal buckets,
      100 rows: its p99 PSI is 0.217, the true one 0.24) and rare buckets make it worse.
    - ks and wasserstein scale as 1/sqrt(n) already from ``_DISTANCE_LIMIT_FROM`` rows: their
      p99 times sqrt(n) at 100 rows is within 1 % of that at 10,000 (10 or 64 equal buckets,
      10 skewed ones; the discrete ks sits up to 4 % lower, on the safe side). Their binned
      limits have no closed form: one simulation at ``_DISTANCE_LIMIT_ROWS`` rows a reference
      serves every n.
    - Otherwise a deterministic simulation: ``SIMULATION_DRAWS`` multinomial windows, seeded
      from the reference, each drawn in O(buckets) with exact binomials (Hörmann's BTRS). The
      threshold is the order statistic at or above the true quantile with 95 % confidence (at
      1 %, about the 99.25th percentile). Measured on 100,000 stable windows for each of the six
      statistics, 100 and 1,000 rows, 10 and 64 equal buckets and 10 skewed ones with a missing
      bucket: 0.46 to 1.05 % breach. Rates below 40 / draws (the Šidák rates of ``feature:
      "*"``) extrapolate the top 40 draws with an exponential tail (on the squared value for js,
      ks and wasserstein), its mean raised to a 95 % bound: chi-square-like tails are lighter
      than exponential, so this mostly errs high, but it is an approximation (at 0.1 %, the
      same cases breach 0 to 1.2 times the rate).
    - Cached per (reference, n bucket): the grid points 2**(j/8) on either side of n are
      simulated, each threshold rescaled to n by the limit's (grid n / n)**k (k: 1 for psi and
      kl, 1/2 for js, 0 for X^2), and the larger taken: right where the rescaled quantile moves
      monotonically across the 9 % step, whichever way it moves (with many near-empty buckets
      it grows with n, as their half-count terms do). The simulated reference is the fractions
      rounded to 2 significant digits (sorted, where the statistic ignores the bucket order), so
      features binned on quantiles share one simulation.
    """
    ref = reference if isinstance(reference, Reference) else Reference.of(reference)
    if not 0 < false_alarm < 0.5:
        raise ValueError(f"false_alarm {false_alarm}: expected a rate in (0, 0.5)")
    if not n >= 1:
        raise ValueError(f"n {n}: expected at least one served row")
    if statistic == "wasserstein" and len(ref.gaps) != ref.placed - 1:
        raise ValueError("wasserstein needs the reference's edges (Reference.of(..., edges))")
    rounded, gaps, df, smallest = _calibration_key(ref, statistic)
    if df < 1:  # one populated bucket: without drift every value is exactly 0
        return 1e-12
    rows = n if ref.rows is None else n * ref.rows / (n + ref.rows)
    if statistic in _PERMUTATION_INVARIANT and rows * smallest >= ASYMPTOTIC_MIN_EXPECTED:
        x2 = _chi2_quantile(1 - false_alarm, df)
        return {"psi": x2 / rows, "kl": x2 / (2 * rows), "js": math.sqrt(x2 / (8 * rows))}.get(
            statistic, x2
        )
    exponent = _N_EXPONENT[statistic]
    if statistic in {"ks", "wasserstein"} and rows >= _DISTANCE_LIMIT_FROM:
        grids: tuple[int, ...] = (_DISTANCE_LIMIT_ROWS,)
    else:
        grids = _grid_neighbours(rows)
    return max(
        _simulated_threshold(statistic, rounded, gaps, grid, false_alarm)
        * math.pow(grid / rows, exponent)
        for grid in grids
    )


@lru_cache(maxsize=4096)
def _calibration_key(
    ref: Reference, statistic: Statistic
) -> tuple[tuple[float, ...], tuple[float, ...], int, float]:
    """What the null distribution depends on: the (value-bucket, for wasserstein) fractions to
    2 significant digits, sorted where the order does not matter; the gaps; df; the smallest
    populated fraction."""
    fractions = ref.fractions[: ref.placed] if statistic == "wasserstein" else ref.fractions
    populated = [f for f in fractions if f > 0]
    if not populated:
        return (), (), -1, 0.0
    mass = sum(populated)
    rounded = tuple(_round2(f / mass) for f in fractions)
    if statistic in _PERMUTATION_INVARIANT:
        rounded = tuple(sorted(rounded, reverse=True))
    gaps = tuple(_round2(g) for g in ref.gaps) if statistic == "wasserstein" else ()
    return rounded, gaps, len(populated) - 1, min(populated) / mass


def _grid_neighbours(n: float) -> tuple[int, ...]:
    """The grid points 2**(k/8) (below 16: the integers) next to ``n``, below and above."""
    if n < 16:
        return tuple(sorted({max(math.floor(n), 1), max(math.ceil(n), 1)}))
    k = 8 * math.log2(n)
    return tuple(sorted({round(2 ** (math.floor(k) / 8)), round(2 ** (math.ceil(k) / 8))}))


def _round2(x: float) -> float:
    return float(f"{x:.2g}") if x > 0 else 0.0


@lru_cache(maxsize=2048)
def _simulated_threshold(
    statistic: Statistic,
    fractions: tuple[float, ...],
    gaps: tuple[float, ...],
    n: int,
    false_alarm: float,
) -> float:
    total = sum(fractions)
    p = tuple(f / total for f in fractions)
    if statistic == "wasserstein":
        ref = Reference._build(p, len(p), gaps, 1.0, _cumulative(p))
    else:
        ref = Reference._build(p, len(p), (), 1.0, ())
    rng = random.Random(zlib.crc32(repr((statistic, fractions, gaps, n)).encode()))
    function = _STATISTIC_FUNCTIONS[statistic]
    values = sorted(function(ref, _multinomial(rng, n, p), n) for _ in range(SIMULATION_DRAWS))
    draws = len(values)
    expected = false_alarm * draws
    if expected >= _TAIL_POINTS:
        above = math.floor(expected - _Z95 * math.sqrt(expected * (1 - false_alarm)))
        return values[draws - 1 - max(above, 0)]
    squared = statistic in {"js", "ks", "wasserstein"}
    top = [v * v if squared else v for v in values[draws - _TAIL_POINTS - 1 :]]
    base = top[0]
    mean_excess = sum(t - base for t in top[1:]) / _TAIL_POINTS
    mean_excess *= 1 + _Z95 / math.sqrt(_TAIL_POINTS)
    level = base + mean_excess * math.log(_TAIL_POINTS / expected)
    return math.sqrt(level) if squared else level


def _cumulative(p: Sequence[float]) -> tuple[float, ...]:
    out = []
    running = 0.0
    for f in p[:-1]:
        running += f
        out.append(running)
    return tuple(out)


def _multinomial(rng: random.Random, n: int, p: Sequence[float]) -> list[int]:
    """Counts of ``n`` draws over ``p``, one conditional binomial a bucket."""
    counts = [0] * len(p)
    left, mass = n, 1.0
    for i, f in enumerate(p):
        if left == 0:
            break
        if i == len(p) - 1 or f >= mass:
            counts[i] = left
            break
        c = _binomial(rng, left, f / mass) if f > 0 else 0
        counts[i] = c
        left -= c
        mass -= f
    return counts


def _binomial(rng: random.Random, n: int, p: float) -> int:
    """One exact Binomial(n, p) draw: inversion where np < 10, else Hörmann's BTRS transformed
    rejection (1993), as Python 3.12's ``random.binomialvariate`` does (this is 3.11)."""
    if n <= 0 or p <= 0.0:
        return 0
    if p >= 1.0:
        return n
    if p > 0.5:
        return n - _binomial(rng, n, 1.0 - p)
    if n * p < 10.0:  # inversion: walk the CDF up from 0, about np steps
        q = 1.0 - p
        ratio = p / q
        pmf = cdf = math.exp(n * math.log1p(-p))
        u = rng.random()
        x = 0
        while u > cdf and x < n:
            x += 1
            pmf *= ratio * (n - x + 1) / x
            cdf += pmf
        return x
    spq = math.sqrt(n * p * (1.0 - p))
    b = 1.15 + 2.53 * spq
    a = -0.0873 + 0.0248 * b + 0.01 * p
    c = n * p + 0.5
    vr = 0.92 - 4.2 / b
    setup = False
    while True:
        u = rng.random() - 0.5
        us = 0.5 - abs(u)
        if us <= 0.0:
            continue
        k = math.floor((2.0 * a / us + b) * u + c)
        if k < 0 or k > n:
            continue
        v = rng.random()
        if us >= 0.07 and v <= vr:  # the squeeze: most draws end here
            return k
        if not setup:
            alpha = (2.83 + 5.1 / b) * spq
            lpq = math.log(p / (1.0 - p))
            m = math.floor((n + 1) * p)
            h = math.lgamma(m + 1) + math.lgamma(n - m + 1)
            setup = True
        v *= alpha / (a / (us * us) + b)
        if v > 0 and math.log(v) <= h - math.lgamma(k + 1) - math.lgamma(n - k + 1) + (k - m) * lpq:
            return k


# --- The chi-square distribution ---------------------------------------------------------------


def chi2_sf(x: float, df: int) -> float:
    """P(chi2(df) > x): the regularised upper incomplete gamma Q(df/2, x/2)."""
    if x <= 0:
        return 1.0
    a, z = df / 2.0, x / 2.0
    if z < a + 1.0:  # series for P, then Q = 1 - P
        term = total = 1.0 / a
        k = a
        while abs(term) > abs(total) * 1e-15:
            k += 1.0
            term *= z / k
            total += term
        return max(0.0, 1.0 - total * math.exp(-z + a * math.log(z) - math.lgamma(a)))
    # Continued fraction for Q (modified Lentz).
    tiny = 1e-300
    b = z + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return math.exp(-z + a * math.log(z) - math.lgamma(a)) * h


@lru_cache(maxsize=1024)
def _chi2_quantile(prob: float, df: int) -> float:
    """The ``prob`` quantile of chi2(df), by bisection on :func:`chi2_sf`."""
    tail = 1.0 - prob
    lo, hi = 0.0, max(2.0 * df, 1.0)
    while chi2_sf(hi, df) > tail:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if chi2_sf(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return (lo + hi) / 2
