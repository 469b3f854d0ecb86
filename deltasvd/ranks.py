"""Rank selection rules, on a layer's singular values (float64 numpy, descending).

- energy: the paper's rule, smallest t with sum(s[:t]) / sum(s) >= T (sum of s, not s^2).
- fro:    the same on s^2 (retained Frobenius energy).
- rank:   a fixed rank.
- size_mb: a whole-file budget, see `allocate_budget`.
- max_error: the smallest file whose weight-relative error (measures.py) is at most the
  value, see `allocate_error`.
Each rule also gives the range of ranks it could pick when every s_i is only known to within
+-err_i (the Gram route); a range wider than one rank sends the layer to a float64 SVD.
"""

from dataclasses import dataclass

import numpy as np

from .errors import UsageError

MODES = ("energy", "fro", "rank", "size_mb", "max_error")
# What the whole-file modes minimise: "weight" (each layer's error against its own weights,
# measures.py; what tracked the pictures) or "fro" (plain squared error, the rule before; kept
# so the fidelity bench can compare the two with the real writer).
OBJECTIVES = ("weight", "fro")


def _first_reaching(ratio, target):
    """1-based index of the first ratio >= target (len(ratio) if none does)."""
    hit = np.nonzero(ratio >= target)[0]
    return int(hit[0]) + 1 if hit.size else len(ratio)


def _threshold_rank(values, target):
    total = float(np.sum(values))
    if values.size == 0 or total <= 0.0:
        return 0
    if target >= 1.0:
        return int(values.size)
    return _first_reaching(np.cumsum(values) / total, target)


def _threshold_range(values, err, target, tail_lo=None, tail_hi=None):
    """(lowest, highest) rank the rule can pick for values known to +-err.

    `tail_lo` / `tail_hi` (optional, per cut t: bounds on sum(values[t:])) tighten the
    per-value bounds on the tail, where most of the uncertainty sits."""
    if values.size == 0 or target >= 1.0:
        t = _threshold_rank(values, target)
        return t, t
    head_hi = np.cumsum(values + err)                         # head_hi[t-1]: sum(values[:t])
    head_lo = np.cumsum(np.maximum(values - err, 0.0))
    rest_hi = np.concatenate([np.cumsum((values + err)[::-1])[::-1][1:], [0.0]])
    rest_lo = np.concatenate([np.cumsum(np.maximum(values - err, 0.0)[::-1])[::-1][1:], [0.0]])
    if tail_hi is not None:
        rest_hi = np.minimum(rest_hi, tail_hi[1:])
        rest_lo = np.maximum(rest_lo, tail_lo[1:])
    upper = head_hi / np.maximum(head_hi + rest_lo, 1e-300)
    lower = head_lo / np.maximum(head_lo + rest_hi, 1e-300)
    return _first_reaching(upper, target), _first_reaching(lower, target)


def tail_bounds(lam, dl, fro2):
    """Bounds on sum(s[t:]) and sum(s[t:]^2) for every cut t (arrays of length n + 1), from
    the eigenvalues `lam` of the Gram matrix (each within +-dl) and the exact ||M||_F^2.

    The tail energy is fro2 minus the head's, and the head's sum is off by at most t*dl (Ky Fan),
    far less than the (n - t)*dl the per-value bounds add up to on a long tail. From the tail
    energy E and its largest value L: sum(sqrt) <= sqrt((n - t) E) (Cauchy-Schwarz) and
    sum(sqrt) >= E / sqrt(L); both are tight for the flat, noise-like tails that leave the
    per-value bounds undecided."""
    n = lam.size
    t = np.arange(n + 1)
    head = np.concatenate([[0.0], np.cumsum(lam)])
    e_hi = np.maximum(fro2 - head + t * dl, 0.0)
    e_lo = np.maximum(fro2 - head - t * dl, 0.0)
    top = np.concatenate([np.maximum(lam, 0.0) + dl, [dl]])   # largest tail eigenvalue, upper
    s_hi = np.sqrt((n - t) * e_hi)
    s_lo = e_lo / np.sqrt(np.maximum(top, 1e-300))
    s_lo[-1] = s_hi[-1] = 0.0
    return (s_lo, s_hi), (e_lo, e_hi)


@dataclass
class RankRule:
    mode: str
    value: float
    min_rank: int = 1
    max_rank: int = None
    objective: str = "weight"
    # True: every rank certified equal to the rule's on the float64 singular values
    # (--exact-ranks); False: the rule on float32 values (spectrum.py; about 1.3x as fast)
    exact: bool = False
    # rank mode: a randomized range finder where it is cheaper, keeping only the head of each
    # spectrum (spectrum.sketched_factors; `compress --rank` unless --exact-ranks)
    sketch: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise UsageError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        v = self.value
        if self.mode in ("energy", "fro") and not (0.0 < v <= 1.0):
            raise UsageError(f"--{self.mode} must be in (0, 1], got {v}")
        if self.mode == "rank" and (v < 1 or int(v) != v):
            raise UsageError(f"--rank must be a whole number >= 1, got {v}")
        if self.mode == "size_mb" and not v > 0:
            raise UsageError(f"--size-mb must be > 0, got {v}")
        if self.mode == "max_error" and not 0.0 < v < 1.0:
            raise UsageError(f"--max-error must be in (0, 1) (0: lossless, 1: nothing kept), "
                             f"got {v}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}")
        if self.min_rank is not None and self.min_rank < 0:
            raise UsageError("--min-rank must be >= 0")
        if self.max_rank is not None and self.max_rank < max(self.min_rank or 0, 1):
            raise UsageError("--max-rank must be >= 1 and >= --min-rank")

    @property
    def per_layer(self):
        return self.mode not in ("size_mb", "max_error")

    def raw_rank(self, s):
        """The rule itself, before clamps."""
        if self.mode == "energy":
            return _threshold_rank(s, self.value)
        if self.mode == "fro":
            return _threshold_rank(s * s, self.value)
        if self.mode == "rank":
            return min(int(self.value), s.size)
        raise ValueError("whole-file ranks come from allocate_budget / allocate_error")

    def raw_range(self, s, err, tails=None):
        """Ranks the rule can pick; `tails` = tail_bounds(...) tightens the tail sums."""
        if self.mode == "energy":
            return _threshold_range(s, err, self.value, *(tails[0] if tails else (None, None)))
        if self.mode == "fro":
            # |s^2 - s'^2| <= err * (2 s + err)
            return _threshold_range(s * s, err * (2.0 * s + err), self.value,
                                    *(tails[1] if tails else (None, None)))
        t = self.raw_rank(s)
        return t, t

    def clamp(self, t, n):
        if self.max_rank is not None:
            t = min(t, self.max_rank)
        if self.min_rank:
            t = max(t, self.min_rank)
        return max(0, min(t, n))


def is_dense(t, d, k):
    """Factors that would be no smaller than the dense delta: store it dense instead."""
    return t * (d + k) >= d * k


def _by_value(layers):
    """Every component of every layer, most valuable per byte first.

    `layers`: list of (s, cost, weight): a layer's singular values (descending), what one more
    component costs (its d + k stored values, in bytes) and what its squared error weighs
    (measures.layer_weight). Component i removes weight * s_i^2 of weighted squared error; s is
    descending, so the gain per byte falls within each layer and taking components in this
    order takes a prefix of each layer: optimal for this separable problem up to the last
    partial step. Returns (order, owner, cost, removed) over the components."""
    removed = np.concatenate([w * s * s for s, _, w in layers])
    owner = np.concatenate([np.full(s.size, i, dtype=np.int64) for i, (s, _, _) in
                            enumerate(layers)])
    cost = np.array([c for _, c, _ in layers], dtype=np.float64)[owner]
    order = np.argsort(-(removed / cost), kind="stable")
    order = order[removed[order] > 0.0]  # a zero singular value buys nothing
    return order, owner, cost, removed


def _counts(taken, owner, n):
    return [int(c) for c in np.bincount(owner[taken], minlength=n)]


def allocate_budget(layers, budget):
    """Ranks minimising the total weighted squared error for a cost of at most `budget`."""
    if not layers:
        return []
    order, owner, cost, _ = _by_value(layers)
    spent = np.cumsum(cost[order])
    return _counts(order[: int(np.searchsorted(spent, budget, side="right"))], owner,
                   len(layers))


def allocate_error(layers, allowed, floor=0.0):
    """The cheapest ranks whose weighted squared error is at most `allowed`, or None when even
    every component of `layers` leaves more. `floor`: weighted error no rank can remove (the
    values past a --max-rank cap, which `layers` leaves out)."""
    if not layers:
        return []
    order, owner, _, removed = _by_value(layers)
    error = floor + float(np.sum(removed))
    left = error - np.concatenate([[0.0], np.cumsum(removed[order])])
    hit = np.nonzero(left <= allowed)[0]
    if not hit.size:
        return None
    return _counts(order[: int(hit[0])], owner, len(layers))
