"""Fraction kept, intervals, verdicts and the tables built from them."""

import math
import statistics

from benchmarks.efficient.methods import label
from benchmarks.paper import report as paper_report
from benchmarks.paper import verdicts

# ---------------------------------------------------------------------------
# Summary: intervals and verdicts.

KEEP = 0.9
COST = 1.25
"""The question: does a method keep >= 90% of SAM's sharpness reduction at
<= 1.25x SGD's step cost without costing accuracy?"""
YES, NO, NOT_SETTLED = "yes", "no", "not settled"
REFERENCES = ("sgd", "sam", "sgdm")
"""No verdict: the two ends of "fraction kept" (0 and 1 by definition) and
Momentum-SAM's baseline, SGD with momentum."""


def fraction_kept(sharp_sgd, sharp_sam, sharp_method):
    """`(sharp_SGD - sharp_method) / (sharp_SGD - sharp_SAM)`; None when SAM
    and SGD are equally sharp."""
    if sharp_sgd == sharp_sam:
        return None
    return (sharp_sgd - sharp_method) / (sharp_sgd - sharp_sam) + 0.0  # no -0.0


def mean_ci(values, level=verdicts.LEVEL):
    """`(mean, (low, high))`: the mean and its Student-t interval (None for
    fewer than two values); `(None, None)` without values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    half = (
        verdicts.t_quantile(0.5 + level / 2, len(values) - 1)
        * statistics.stdev(values)
        / math.sqrt(len(values))
    )
    return mean, (mean - half, mean + half)


def costs_accuracy(error_vs_sgd_ci, error_vs_sam_ci):
    """A method costs accuracy when its test error is significantly above
    both SGD's and SAM's (each paired 95% interval lies above 0): matching
    SAM's test error is what a cheaper SAM aims at, also where SAM's is above
    SGD's."""
    return all(ci is not None and ci[0] > 0 for ci in (error_vs_sgd_ci, error_vs_sam_ci))


def _pct(fraction):
    """A fraction as a whole percentage, never "-0%"."""
    return f"{round(100 * fraction) + 0:d}%"


def verdict(cost, kept_ci, error_vs_sgd_ci, error_vs_sam_ci, all_converged=True):
    """`(word, reason)` for "keeps >= KEEP of SAM's reduction at <= COST
    without costing accuracy".

    no: the median cost is above COST, or the 95% interval of the fraction
    kept lies below KEEP, or the method costs accuracy (`costs_accuracy`);
    yes: the cost is within COST, the fraction's interval lies at or above
    KEEP, the method does not cost accuracy, and every run converged; not
    settled: anything else (an interval across KEEP, too few seeds, a run
    that did not converge)."""
    if cost is None:
        return NOT_SETTLED, "no paired SGD run"
    if cost > COST:
        return NO, f"cost {cost:.2f}x > {COST}x"
    if kept_ci is None or error_vs_sgd_ci is None or error_vs_sam_ci is None:
        return NOT_SETTLED, "fewer than 2 seeds"
    if kept_ci[1] < KEEP:
        return NO, f"keeps < {KEEP:.0%} (interval up to {_pct(kept_ci[1])})"
    if costs_accuracy(error_vs_sgd_ci, error_vs_sam_ci):
        return NO, "test error above both SGD's and SAM's"
    if kept_ci[0] < KEEP:
        return NOT_SETTLED, (f"interval {_pct(kept_ci[0])}-{_pct(kept_ci[1])} spans {KEEP:.0%}")
    if not all_converged:
        return NOT_SETTLED, "not every run converged"
    return YES, f"keeps {_pct(kept_ci[0])}-{_pct(kept_ci[1])} at {cost:.2f}x"


def overall(words):
    """One word over the architectures: no if any says no, yes if all say yes."""
    words = list(words)
    if NO in words:
        return NO
    return YES if words and all(w == YES for w in words) else NOT_SETTLED


def summarize(args, runs):
    """`{model: rows}`, one row per method with runs: means ± std over seeds,
    the paired (same seed) cost, fraction kept and test-error difference to
    SGD with 95% intervals, convergence and the verdict."""
    out = {}
    for model in args.models:
        by = {(r["method"], r["seed"]): r for r in runs if r["config"]["model"] == model}
        rows = []
        for method in args.methods:
            mine = {s: by[(method, s)] for s in args.seeds if (method, s) in by}
            if not mine:
                continue
            finals = [r["final"] for r in mine.values()]

            def of(m, key, by=by):
                return {s: by[(m, s)]["final"][key] for s in args.seeds if (m, s) in by}

            sgd_ms = of("sgd", "epoch_ms_per_step")
            costs = [
                f["epoch_ms_per_step"] / sgd_ms[s]
                for s, f in ((s, r["final"]) for s, r in mine.items())
                if s in sgd_ms
            ]
            sharp, sgd_sharp, sam_sharp = (
                of(m, "worst_case_sharpness") for m in (method, "sgd", "sam")
            )
            kept = [
                fraction_kept(sgd_sharp[s], sam_sharp[s], sharp[s])
                for s in sharp
                if s in sgd_sharp and s in sam_sharp
            ]
            error = verdicts.paired(of(method, "test_error"), of("sgd", "test_error"))
            error_sam = verdicts.paired(of(method, "test_error"), of("sam", "test_error"))
            convergence = [verdicts.convergence_of(r["epochs"])["converged"] for r in mine.values()]
            row = {
                "method": method,
                "label": label(method, args),
                "runs": len(finals),
                "converged": sum(convergence),
                "epochs": [len(r["epochs"]) for r in mine.values()],
                "cost": statistics.median(costs) if costs else None,
                "cost_range": (min(costs), max(costs)) if costs else None,
                "ms_per_step": statistics.median(f["epoch_ms_per_step"] for f in finals),
                "sam_fraction": statistics.fmean(f["sam_fraction"] for f in finals),
                "sharpness": paper_report._mean_std([f["worst_case_sharpness"] for f in finals]),
                "grad_norm": paper_report._mean_std([f["full_gradient_norm"] for f in finals]),
                "test_error": paper_report._mean_std([f["test_error"] for f in finals]),
                "train_loss": paper_report._mean_std([f["train_loss"] for f in finals]),
                "kept_by_seed": mean_ci(kept),
                "error_vs_sgd": (error["mean_difference"], error["ci"]),
                "error_vs_sam": (error_sam["mean_difference"], error_sam["ci"]),
            }
            rows.append(row)
        by_row = {r["method"]: r for r in rows}
        for r in rows:
            sgd, sam = by_row.get("sgd"), by_row.get("sam")
            r["fraction_kept"] = (
                fraction_kept(sgd["sharpness"][0], sam["sharpness"][0], r["sharpness"][0])
                if sgd and sam
                else None
            )
            if r["method"] in REFERENCES:
                r["verdict"], r["reason"] = "—", "reference"
            else:
                r["verdict"], r["reason"] = verdict(
                    r["cost"],
                    r["kept_by_seed"][1],
                    r["error_vs_sgd"][1],
                    r["error_vs_sam"][1],
                    r["converged"] == r["runs"],
                )
        out[model] = rows
    return out


def verdict_rows(args, tables):
    """`[{"method", "label", model: word..., "overall"}]` for the methods
    with a verdict on some architecture."""
    rows = []
    for method in args.methods:
        if method in REFERENCES:
            continue
        words = {
            m: next((r["verdict"] for r in rows_ if r["method"] == method), None)
            for m, rows_ in tables.items()
        }
        if not any(words.values()):
            continue
        rows.append(
            {
                "method": method,
                "label": label(method, args),
                **words,
                "overall": overall(w for w in words.values() if w)
                if all(words.values())
                else NOT_SETTLED,
            }
        )
    return rows


def _num(value, fmt):
    return "—" if value is None else format(value, fmt)


def _ci(mean_and_ci, scale=100.0, unit="%"):
    """`mean [low, high]` in whole percent, or in signed points (`unit` "points")."""
    mean, ci = mean_and_ci
    if mean is None:
        return "—"

    def fmt(value):
        if unit == "%":
            return f"{round(scale * value) + 0:d}"
        return f"{round(scale * value, 2) + 0.0:+.2f}"

    text = fmt(mean) + ("%" if unit == "%" else "")
    return text if ci is None else f"{text} [{fmt(ci[0])}, {fmt(ci[1])}]"


def table_markdown(rows):
    lines = [
        "| method | runs | converged | cost per step / SGD | cost by seed | SAM steps | "
        "worst-case sharpness | fraction kept | fraction kept by seed [95% CI] | "
        "test error % | vs SGD, points [95% CI] | vs SAM, points [95% CI] | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo_hi = r["cost_range"]
        lines.append(
            f"| {r['label']} | {r['runs']} | {r['converged']}/{r['runs']} | "
            f"{_num(r['cost'], '.2f')} | "
            + ("—" if lo_hi is None else f"{lo_hi[0]:.2f}-{lo_hi[1]:.2f}")
            + " | "
            f"{r['sam_fraction']:.2f} | {paper_report._fmt_sci(*r['sharpness'])} | "
            f"{_num(r['fraction_kept'], '.2f')} | {_ci(r['kept_by_seed'])} | "
            f"{paper_report._fmt(*r['test_error'], scale=100)} | "
            f"{_ci(r['error_vs_sgd'], unit='points')} | "
            f"{_ci(r['error_vs_sam'], unit='points')} | "
            + (r["verdict"] if r["verdict"] == "—" else f"{r['verdict']} ({r['reason']})")
            + " |"
        )
    return "\n".join(lines) + "\n"


def verdict_markdown(args, tables):
    models = list(tables)
    lines = ["| method | " + " | ".join(models) + " | both |", "|---" * (len(models) + 2) + "|"]
    for r in verdict_rows(args, tables):
        lines.append(
            f"| {r['label']} | "
            + " | ".join(r[m] or "—" for m in models)
            + f" | **{r['overall']}** |"
        )
    return "\n".join(lines) + "\n"


def not_costing_accuracy(r):
    """`costs_accuracy` is false for the row."""
    return not costs_accuracy(r["error_vs_sgd"][1], r["error_vs_sam"][1])


def pareto_front(rows):
    """Rows no other row beats on both cost and mean sharpness (by cost)."""
    rows = [r for r in rows if r["cost"] is not None]
    front = [
        r
        for r in rows
        if not any(
            o["cost"] <= r["cost"]
            and o["sharpness"][0] <= r["sharpness"][0]
            and (o["cost"] < r["cost"] or o["sharpness"][0] < r["sharpness"][0])
            for o in rows
        )
    ]
    return sorted(front, key=lambda r: r["cost"])


def accurate_front(rows):
    """The Pareto front of the methods that do not cost accuracy."""
    return pareto_front([r for r in rows if not_costing_accuracy(r)])


def guidance(args, tables):
    """Sentences read off the tables (so the README types no figure)."""
    lines = []
    for model, rows in tables.items():
        by = {r["method"]: r for r in rows}
        if not ("sgd" in by and "sam" in by):
            lines.append(f"{model}: needs SGD and SAM runs.")
            continue
        sgd, sam = by["sgd"], by["sam"]
        if sam["sharpness"][0] >= sgd["sharpness"][0]:
            lines.append(
                f"{model}: SAM was not flatter than SGD, so the fraction kept is not meaningful."
            )
            continue
        lines.append(
            f"{model}: SAM lowers the worst-case sharpness from {sgd['sharpness'][0]:.3g} "
            f"(SGD) to {sam['sharpness'][0]:.3g} at {_num(sam['cost'], '.2f')}x SGD's step "
            f"cost; test error SGD {100 * sgd['test_error'][0]:.1f}%, SAM "
            f"{100 * sam['test_error'][0]:.1f}%. Pareto front of the methods whose test "
            "error is not significantly above both SGD's and SAM's: "
            + ", ".join(f"{r['label']} ({_num(r['cost'], '.2f')}x)" for r in accurate_front(rows))
            + "."
        )
    verdict_of = verdict_rows(args, tables)
    where = "both architectures" if len(tables) > 1 else "this architecture"
    for word, text in ((YES, "Keep"), (NOT_SETTLED, "Not settled whether they keep")):
        names = [r["label"] for r in verdict_of if r["overall"] == word]
        lines.append(
            f"{text} {KEEP:.0%} of SAM's sharpness reduction at <= {COST}x SGD's step "
            f"cost without costing accuracy on {where}: "
            + (", ".join(names) if names else "none")
            + "."
        )
    return lines
