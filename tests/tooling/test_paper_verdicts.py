"""Tests of benchmarks.paper.verdicts: convergence, Student's t, paired
comparisons and the claims' verdicts, against closed forms and float64
NumPy computed here."""

import math
import statistics

import numpy as np
import pytest

from benchmarks.paper import verdicts as v

# ---------------------------------------------------------------------------
# Student's t against closed forms.


def _cdf_df1(t):  # Cauchy
    return 0.5 + math.atan(t) / math.pi


def _cdf_df2(t):
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


def _quantile_df2(p):
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


@pytest.mark.parametrize("t", [-40.0, -3.0, -0.4, 0.0, 0.25, 1.0, 4.3, 100.0])
def test_t_cdf_matches_closed_forms(t):
    assert v.t_cdf(t, 1) == pytest.approx(_cdf_df1(t), abs=1e-14)
    assert v.t_cdf(t, 2) == pytest.approx(_cdf_df2(t), abs=1e-14)


def test_t_cdf_df3_closed_form_and_large_df_normal():
    # df = 3: 1/2 + (1/pi) [ x / (sqrt(3) (1 + x^2/3)) + atan(x / sqrt(3)) ].
    for t in (-2.0, 0.5, 3.0):
        ref = 0.5 + (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi
        assert v.t_cdf(t, 3) == pytest.approx(ref, abs=1e-14)
    normal = statistics.NormalDist()
    for t in (-1.5, 0.3, 2.0):
        assert v.t_cdf(t, 4000) == pytest.approx(normal.cdf(t), abs=1e-4)


def test_t_quantile_matches_the_tables_for_the_seed_counts_used():
    # Student-t tables, 97.5% quantile: df 4 (5 seeds) and df 5 (6 seeds).
    assert v.t_quantile(0.975, 4) == pytest.approx(2.776445, abs=5e-7)
    assert v.t_quantile(0.975, 5) == pytest.approx(2.570582, abs=5e-7)
    assert v.t_quantile(0.975, 9) == pytest.approx(2.262157, abs=5e-7)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantile_inverts_the_cdf(p):
    assert v.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
    assert v.t_quantile(p, 2) == pytest.approx(_quantile_df2(p), rel=1e-10)
    for df in (3, 4, 7, 30):
        assert v.t_cdf(v.t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)
    assert v.t_quantile(1 - p, 5) == -v.t_quantile(p, 5)


def test_t_bad_arguments():
    with pytest.raises(ValueError, match="df"):
        v.t_cdf(1.0, 0)
    with pytest.raises(ValueError, match="p"):
        v.t_quantile(1.0, 3)


# ---------------------------------------------------------------------------
# Paired comparisons.


def test_paired_three_seeds_matches_the_closed_form_interval():
    a = {0: 0.10, 1: 0.12, 2: 0.08, 7: 5.0}  # seed 7 has no partner: left out
    b = {0: 0.20, 1: 0.30, 2: 0.11, 3: 9.0}
    r = v.paired(a, b, log=True)
    d = np.log([0.10, 0.12, 0.08]) - np.log([0.20, 0.30, 0.11])
    mean, se = d.mean(), d.std(ddof=1) / math.sqrt(3)
    half = _quantile_df2(0.975) * se
    assert r["n"] == 3
    assert r["mean_difference"] == pytest.approx(mean, rel=1e-12)
    assert r["ci"] == pytest.approx((mean - half, mean + half), rel=1e-9)
    assert r["p"] == pytest.approx(2 * (1 - _cdf_df2(abs(mean) / se)), rel=1e-9)
    assert r["ratio"] == pytest.approx(math.exp(mean), rel=1e-12)
    assert r["ratio_ci"] == pytest.approx((math.exp(mean - half), math.exp(mean + half)))
    assert r["mean_a"] == pytest.approx(0.10) and r["mean_b"] == pytest.approx(0.61 / 3)


def test_paired_raw_scale_and_degenerate_cases():
    r = v.paired({0: 0.05, 1: 0.07}, {0: 0.06, 1: 0.06})
    d = np.array([-0.01, 0.01])
    half = math.tan(math.pi * 0.475) * d.std(ddof=1) / math.sqrt(2)  # df = 1
    assert r["ci"] == pytest.approx((-half, half), abs=1e-15)
    assert "ratio" not in r
    one = v.paired({0: 1.0}, {0: 2.0})
    assert one["n"] == 1 and one["ci"] is None and one["p"] is None
    same_shift = v.paired({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5})
    assert same_shift["ci"] == (0.5, 0.5) and same_shift["p"] == 0.0
    # A diverged run (nan) or a sharpness of 0 on the log scale: left out.
    kept = v.paired(
        {0: 1.0, 1: float("nan"), 2: 0.0, 3: 2.0}, {0: 0.5, 1: 1.0, 2: 1.0, 3: 1.0}, log=True
    )
    assert kept["n"] == 2 and kept["left_out"] == 2
    assert kept["ratio"] == pytest.approx(2.0) and kept["ci"] == pytest.approx(
        (math.log(2.0), math.log(2.0))
    )
    none = v.paired({0: float("inf")}, {0: 1.0})
    assert none["n"] == 0 and none["ci"] is None and none["mean_a"] is None


def test_decide_and_overall():
    assert v.decide((-2.0, -0.1), "less") == v.REPRODUCED
    assert v.decide((0.1, 2.0), "less") == v.NOT_REPRODUCED
    assert v.decide((-0.1, 2.0), "less") == v.NOT_SETTLED
    assert v.decide((0.1, 2.0), "greater") == v.REPRODUCED
    assert v.decide((-2.0, -0.1), "greater") == v.NOT_REPRODUCED
    assert v.decide(None, "greater") == v.NOT_SETTLED
    # "at most" (a <= b): an interval of exactly 0 (equal step counts) holds too.
    assert v.decide((0.0, 0.0), "at_most") == v.REPRODUCED
    assert v.decide((-3.0, -1.0), "at_most") == v.REPRODUCED
    assert v.decide((0.5, 2.0), "at_most") == v.NOT_REPRODUCED
    assert v.decide((-0.5, 2.0), "at_most") == v.NOT_SETTLED
    assert v.decide((0.0, 0.0), "less") == v.NOT_SETTLED
    with pytest.raises(ValueError, match="direction"):
        v.decide((0.0, 1.0), "more")
    R, N, S = v.REPRODUCED, v.NOT_REPRODUCED, v.NOT_SETTLED
    assert v.overall([R, R]) == R
    assert v.overall([N, N]) == N
    assert v.overall([N, S]) == N
    assert v.overall([R, S]) == S
    assert v.overall([R, N]) == S
    assert v.overall([]) == S


# ---------------------------------------------------------------------------
# Convergence.


def test_convergence_rule():
    # 20 epochs: window 2, compares epoch 20 with epoch 18.
    losses = [1.0] * 17 + [0.50, 0.49, 0.48]
    c = v.convergence(losses)
    assert c["window"] == 2
    assert c["change"] == pytest.approx(0.02)
    assert c["tolerance"] == pytest.approx(0.025)  # 5% of 0.50
    assert c["converged"]
    moving = v.convergence([1.0] * 17 + [0.50, 0.45, 0.40])
    assert not moving["converged"] and moving["relative_change"] == pytest.approx(0.2)
    # Near zero the absolute 0.01 applies: 0.03 -> 0.021 is 30% but 0.009.
    small = v.convergence([1.0] * 8 + [0.03, 0.021])
    assert small["window"] == 1 and small["tolerance"] == 0.01 and small["converged"]
    assert not v.convergence([1.0, float("nan")])["converged"]
    assert not v.convergence([0.5])["converged"]


# ---------------------------------------------------------------------------
# Verdicts from run records.


def _run(method, schedule, seed, sharpness, error):
    return {
        "method": method,
        "schedule": schedule,
        "seed": seed,
        "final": {"worst_case_sharpness": sharpness, "test_error": error},
    }


def test_verdicts_from_runs():
    rng = np.random.default_rng(0)
    runs = []
    for seed in range(5):
        base = float(rng.uniform(0.04, 0.06))
        noise = [float(x) for x in rng.uniform(0.9, 1.1, size=4)]
        for method, scale in (("sgd", 1.0), ("sam", 1.0)):
            runs += [
                _run(method, "constant", seed, scale * base, 0.10 + 0.01 * noise[0]),
                _run(method, "B", seed, 0.2 * base * noise[1], 0.05 + 0.01 * noise[1]),
                _run(method, "C", seed, base * noise[2], 0.10 + 0.01 * noise[2]),
            ]
    results = {r["claim"]: r for r in v.verdicts(runs)}
    flatter = results["+B is flatter than constant"]
    assert flatter["verdict"] == v.REPRODUCED
    assert [c["a"] for c in flatter["comparisons"]] == [["sgd", "B"], ["sam", "B"]]
    c = flatter["comparisons"][0]
    ref = v.paired(
        *[
            {
                r["seed"]: r["final"]["worst_case_sharpness"]
                for r in runs
                if r["method"] == "sgd" and r["schedule"] == s
            }
            for s in ("B", "constant")
        ],
        log=True,
    )
    assert c["ratio"] == ref["ratio"] and c["ci"] == ref["ci"]
    assert 0.18 < c["ratio"] < 0.22
    # C is within +-10% of constant: no side.
    assert results["+C is sharper than constant"]["verdict"] == v.NOT_SETTLED
    assert results["+B has a lower test error than constant"]["verdict"] == v.REPRODUCED
    # No GSAM, no BC and no control in these runs: those comparisons are left out.
    against_sgd = results["SAM/GSAM are flatter than SGD"]["comparisons"]
    assert {tuple(c["a"]) for c in against_sgd} == {("sam", "constant"), ("sam", "B"), ("sam", "C")}
    assert "+B and +C together (BC) are flatter than constant" not in results
    assert flatter["total"] == 3 and len(flatter["comparisons"]) == 2  # no GSAM
    assert "+B is flatter than constant with as many steps (control)" not in results


def test_steps_and_examples_of_runs_stored_before_final_held_them():
    old = {"final": {"test_error": 0.1}, "steps_per_epoch": [3, 2], "examples": 80}
    assert v._final(old, "steps") == 5 and v._final(old, "examples") == 80
    new = {"final": {"steps": 7, "examples": 90}, "steps_per_epoch": [3, 2], "examples": 80}
    assert v._final(new, "steps") == 7 and v._final(new, "examples") == 90
    with pytest.raises(KeyError):
        v._final(old, "worst_case_sharpness")
