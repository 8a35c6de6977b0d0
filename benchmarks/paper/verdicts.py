"""The paper's claims, tested on the stored runs: convergence, paired
comparisons across seeds, and a verdict per claim.

Everything here is plain Python on finished run records (no training):

- `convergence(losses)`: has a run's training loss stopped moving?
- `paired(a, b, log)`: the mean difference of two settings over the seeds
  they share, its Student-t 95% confidence interval and two-sided p-value;
  runs with the same seed start from the same weights and see the same
  shuffles, so the pairs are matched;
- `CLAIMS` and `verdicts(runs)`: each claim of the paper as comparisons
  between grid cells, each comparison reproduced / not reproduced / not
  settled from its confidence interval, and the claim's word from all of
  its comparisons.

Sharpness spans orders of magnitude between settings, so its comparisons are
made on log(sharpness) (a ratio, as the paper's table invites: "compare
ratios within a table"); the test error on its own scale (percentage points).
"""

import math
import statistics

from benchmarks.paper.protocol import CONVERGENCE_ABSOLUTE
from benchmarks.paper.protocol import CONVERGENCE_RELATIVE
from benchmarks.paper.protocol import CONVERGENCE_WINDOW
from benchmarks.paper.protocol import STEPS_CONTROL

LEVEL = 0.95

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_SETTLED = "not settled"


# ---------------------------------------------------------------------------
# Convergence.


def convergence(losses):
    """`{"window", "change", "relative_change", "tolerance", "converged"}` of
    per-epoch training losses: the change over the last 10% of the epochs
    against max(5% of the earlier loss, 0.01)."""
    epochs = len(losses)
    if epochs < 2:
        return {
            "window": 0,
            "change": math.nan,
            "relative_change": math.nan,
            "tolerance": math.nan,
            "converged": False,
        }
    window = min(max(1, round(CONVERGENCE_WINDOW * epochs)), epochs - 1)
    before, last = losses[-1 - window], losses[-1]
    change = abs(last - before)
    tolerance = max(CONVERGENCE_RELATIVE * abs(before), CONVERGENCE_ABSOLUTE)
    finite = math.isfinite(change)
    return {
        "window": window,
        "change": change,
        "relative_change": change / abs(before) if before else math.inf,
        "tolerance": tolerance,
        "converged": bool(finite and change < tolerance),
    }


def convergence_of(epochs):
    """`convergence` of per-epoch records (`train_loss` in each), e.g. a run
    record's `epochs`."""
    return convergence([e["train_loss"] for e in epochs])


# ---------------------------------------------------------------------------
# Student's t distribution (integer degrees of freedom, closed form).


def t_cdf(t, df):
    """P(T <= t) for Student's t with integer `df` >= 1 (Abramowitz & Stegun
    26.7.3-4: a finite sum in theta = atan(t / sqrt(df)))."""
    if df < 1 or int(df) != df:
        raise ValueError(f"`df` must be an int >= 1, got {df!r}")
    df = int(df)
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        a = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    else:
        term = total = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        a = math.sin(theta) * total
    return 0.5 + 0.5 * a if t >= 0 else 0.5 - 0.5 * a


def t_quantile(p, df):
    """The `p` quantile of Student's t with integer `df` (bisection)."""
    if not 0 < p < 1:
        raise ValueError(f"`p` must be in (0, 1), got {p!r}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------
# Paired comparisons.


def paired(a, b, log=False, level=LEVEL):
    """Compares two settings seed by seed.

    Args:
        a, b: `{seed: value}` of the two settings; only the seeds in both count.
        log: compare log(a) - log(b).
        level: confidence level of the interval.

    Returns:
        A dict: `n` (pairs), `left_out` (shared seeds left out because a value
        is not finite, or not > 0 with `log`: a diverged run or a sharpness
        of exactly 0 counts as no evidence), `mean_a`, `mean_b`, `mean_difference` (mean of
        a - b, or of log a - log b), `ci` (its Student-t interval, None for
        fewer than 2 pairs), `p` (two-sided paired t-test, None likewise) and
        `ratio`/`ratio_ci` (exp of the log difference) when `log`.
    """

    def usable(value):
        return math.isfinite(value) and (value > 0 or not log)

    shared = sorted(set(a) & set(b))
    seeds = [s for s in shared if usable(a[s]) and usable(b[s])]
    xs, ys = [a[s] for s in seeds], [b[s] for s in seeds]
    f = math.log if log else (lambda v: v)
    d = [f(x) - f(y) for x, y in zip(xs, ys)]
    n = len(d)
    out = {
        "n": n,
        "left_out": len(shared) - n,
        "mean_a": statistics.fmean(xs) if n else None,
        "mean_b": statistics.fmean(ys) if n else None,
        "mean_difference": statistics.fmean(d) if n else None,
        "ci": None,
        "p": None,
    }
    if n >= 2:
        mean, se = out["mean_difference"], statistics.stdev(d) / math.sqrt(n)
        if se > 0:
            half = t_quantile(0.5 + level / 2, n - 1) * se
            out["ci"] = (mean - half, mean + half)
            out["p"] = 2 * (1 - t_cdf(abs(mean) / se, n - 1))
        else:  # every pair differs by the same amount
            out["ci"] = (mean, mean)
            out["p"] = 1.0 if mean == 0 else 0.0
    if log and n:
        out["ratio"] = math.exp(out["mean_difference"])
        out["ratio_ci"] = None if out["ci"] is None else tuple(math.exp(c) for c in out["ci"])
    return out


def decide(ci, direction):
    """reproduced when the interval lies on the claimed side of 0
    (`direction` "less": a < b; "greater": a > b; "at_most": a <= b, which
    an interval of exactly 0, as from equal step counts, also meets), not
    reproduced when it lies on the other side, not settled when it contains
    0 (or is None)."""
    if ci is None:
        return NOT_SETTLED
    lo, hi = ci
    below, above = hi < 0, lo > 0
    if direction == "at_most":
        return REPRODUCED if hi <= 0 else NOT_REPRODUCED if above else NOT_SETTLED
    if direction == "less":
        return REPRODUCED if below else NOT_REPRODUCED if above else NOT_SETTLED
    if direction == "greater":
        return REPRODUCED if above else NOT_REPRODUCED if below else NOT_SETTLED
    raise ValueError(f"`direction` must be 'less' or 'greater', got {direction!r}")


def overall(words):
    """The claim's word from its comparisons' words."""
    words = list(words)
    if not words:
        return NOT_SETTLED
    if all(w == REPRODUCED for w in words):
        return REPRODUCED
    if all(w == NOT_REPRODUCED for w in words):
        return NOT_REPRODUCED
    if REPRODUCED not in words and NOT_REPRODUCED in words:
        return NOT_REPRODUCED
    return NOT_SETTLED


# ---------------------------------------------------------------------------
# The paper's claims.

SAM_METHODS = ("sam", "gsam")
BASE_SCHEDULES = ("constant", "B", "C")


def _same_method(schedule, other, methods=("sgd", "sam", "gsam")):
    return [((m, schedule), (m, other)) for m in methods]


def _against_sgd(schedules=BASE_SCHEDULES):
    return [((m, s), ("sgd", s)) for s in schedules for m in SAM_METHODS]


def _grown_batch_claims(rule, rule_C, steps_control=False):
    """The claims of a batch that grows during training (`rule` with the
    constant rate, `rule_C` with the cosine one) against the paper's fixed
    doubling: with the constant rate against B, with the cosine rate
    against BC; like for like against B with the noise scale estimate on
    (B_measured: the grown runs train with it, and on one device its halves
    change a BatchNorm model's clean gradient); against the constant batch
    of the same rate; with `steps_control`, against B's steps-matched
    control too. "At least as flat" / "no more" hold where the interval of
    a - b lies at or below 0, fail where it lies above."""
    vs_b = _same_method(rule, "B") + _same_method(rule_C, "BC")
    vs_measured = _same_method(rule, "B_measured")
    vs_constant = _same_method(rule, "constant") + _same_method(rule_C, "C")
    sharpness, error = "worst_case_sharpness", "test_error"
    claims = [(f"{rule} is at least as flat as +B", sharpness, "at_most", vs_b)]
    if steps_control:
        claims.append(
            (
                f"{rule} is at least as flat as +B's steps-matched control (constant_steps)",
                sharpness,
                "at_most",
                _same_method(rule, STEPS_CONTROL),
            )
        )
    return claims + [
        (
            f"{rule} is at least as flat as +B with the estimate on (B_measured)",
            sharpness,
            "at_most",
            vs_measured,
        ),
        (f"{rule} needs no more optimizer steps than +B", "steps", "at_most", vs_b),
        (f"{rule} needs no more examples than +B", "examples", "at_most", vs_b),
        (f"{rule} has a test error no higher than +B", error, "at_most", vs_b),
        (
            f"{rule} has a test error no higher than +B with the estimate on (B_measured)",
            error,
            "at_most",
            vs_measured,
        ),
        (f"{rule} has a test error no higher than constant", error, "at_most", vs_constant),
    ]


CLAIMS = (
    # (claim, metric, direction of a vs b, comparisons [((method, schedule) a, b)])
    ("+B is flatter than constant", "worst_case_sharpness", "less", _same_method("B", "constant")),
    (
        "+B is flatter than constant with as many steps (control)",
        "worst_case_sharpness",
        "less",
        _same_method("B", "constant_steps"),
    ),
    (
        "+C is sharper than constant",
        "worst_case_sharpness",
        "greater",
        _same_method("C", "constant"),
    ),
    (
        "+B and +C together (BC) are flatter than constant",
        "worst_case_sharpness",
        "less",
        _same_method("BC", "constant"),
    ),
    ("SAM/GSAM are flatter than SGD", "worst_case_sharpness", "less", _against_sgd()),
    (
        "+B has a lower test error than constant",
        "test_error",
        "less",
        _same_method("B", "constant"),
    ),
    (
        "+C has a lower test error than constant",
        "test_error",
        "less",
        _same_method("C", "constant"),
    ),
    ("SAM/GSAM have a lower test error than SGD", "test_error", "less", _against_sgd()),
    # The batch grown by the noise scale (keras_sam.callbacks.AdaptiveBatchSize)
    # and on a plateau of the training loss (BatchSizeOnPlateau).
    *_grown_batch_claims("adaptive", "adaptive_C"),
    *_grown_batch_claims("plateau", "plateau_C", steps_control=True),
)


def _final(record, metric):
    """A run's final `metric`; the optimizer steps and examples of runs
    stored before `final` held them, from their per-epoch records."""
    if metric in record["final"]:
        return record["final"][metric]
    if metric == "steps":
        return sum(record["steps_per_epoch"])
    if metric == "examples":
        return record["examples"]
    raise KeyError(metric)


def _values(runs, method, schedule, metric):
    return {
        r["seed"]: _final(r, metric)
        for r in runs
        if r["method"] == method and r["schedule"] == schedule
    }


def verdicts(runs):
    """Every claim with at least one comparison whose two settings are in
    `runs` (a smaller grid leaves comparisons out; the claim's word is over
    the ones present, and `total` says how many the claim has): a list of
    `{"claim", "metric", "direction", "verdict", "total", "comparisons"}`;
    each comparison holds `a`, `b` (method, schedule), `paired(...)`'s
    fields and its `verdict`."""
    out = []
    for claim, metric, direction, pairs in CLAIMS:
        comparisons = []
        for a, b in pairs:
            va = _values(runs, *a, metric)
            vb = _values(runs, *b, metric) if va else {}
            if not (set(va) & set(vb)):
                continue
            stats = paired(va, vb, log=metric == "worst_case_sharpness")
            comparisons.append(
                {"a": list(a), "b": list(b), **stats, "verdict": decide(stats["ci"], direction)}
            )
        if comparisons:
            out.append(
                {
                    "claim": claim,
                    "metric": metric,
                    "direction": direction,
                    "verdict": overall(c["verdict"] for c in comparisons),
                    "total": len(pairs),
                    "comparisons": comparisons,
                }
            )
    return out
