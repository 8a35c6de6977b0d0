"""Cheaper SAM on MNIST-1D: does a cheaper schedule keep 90% of SAM's
flatness at <= 1.25x SGD's step cost without costing accuracy?

Trains both MNIST-1D networks of `benchmarks.paper` (the CNN with BatchNorm,
the MLP without normalization) with plain SGD, SAM, GSAM, SAM with its second
gradient every k-th step only (`sam_every` 2, 5, 10), LookSAM (`sam_every=5`,
`alpha` 0.7, 0.3 and 0.1), AE-SAM (threshold `AESAM_THRESHOLD`, about a
quarter of the steps are SAM steps), MESA, and Momentum-SAM with its own
baseline (SGD with momentum, which it needs), all with the same data, epochs,
batch size, learning-rate schedule and radius, over five seeds. A run whose
training loss still moves after its epochs trains on until it stops (the
paper benchmark's convergence criterion, reported per run in `runs.md`).
After each run: worst-case sharpness and full-gradient norm (the paper
benchmark's measures, from `benchmarks.paper.run.train_one`) and the test error.

The cost of a method is its time per step as a user timing epochs sees it:
each epoch's wall time from its first step to the end of its last over its
steps, the median over the epochs after the first (tracing), divided by
SGD's of the same seed; the median over seeds. "Fraction kept" is the share
of SAM's sharpness reduction a method keeps,
`(sharp_SGD - sharp_method) / (sharp_SGD - sharp_SAM)`, from the means and
seed by seed (same initialization and data order) with a Student-t 95%
interval; the test error is compared with SGD's and SAM's seed by seed likewise.
`verdict` turns the intervals into yes / no / not settled.

Run from the repository root:

    python -m benchmarks.efficient                 # 130 runs, ~25 min on 2 cores
    python -m benchmarks.efficient --methods sgd,sam,looksam5 --seeds 0 --epochs 2

Outputs (in `--out`, default benchmarks/results/efficient): `results.md`,
`runs.md`, `summary.json`, `sharpness_vs_cost.png` and
`runs/<model>/<method>_<schedule>_seed<k>.json` (one per finished run,
written atomically; rerunning the same command skips them, and a stored run
made with another configuration is an error).
"""

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import sys
import time

import keras  # noqa: E402

import keras_sam  # noqa: E402
from benchmarks.paper import cli as paper_cli  # noqa: E402
from benchmarks.paper import data as paper_data  # noqa: E402
from benchmarks.paper import protocol  # noqa: E402
from benchmarks.paper import report as paper_report  # noqa: E402
from benchmarks.paper import run as paper_run  # noqa: E402
from benchmarks.paper import verdicts  # noqa: E402

COMMAND = "python -m benchmarks.efficient"
"""How this benchmark is run (from the repository root); reports quote it."""

SAM_EVERY = (2, 5, 10)
LOOKSAM_EVERY = 5
LOOKSAM_ALPHA = 0.7
AESAM_THRESHOLD = 0.4
"""AE-SAM's c in `||g||^2 >= mean + c * std`. A normal law would give 34% SAM
steps at 0.4 (24% at 0.7), but `||g||^2` is skewed to the right here: on the
CNN 0.7 gave about 17% SAM steps, 0.5 about 19%, 0.3 about 25%, and 0.4 about
23%; the MLP takes more at 0.4 (the share measured is in the table)."""

LOOKSAM_ALPHAS = (0.3, 0.1)
"""LookSAM's alpha besides `LOOKSAM_ALPHA` (the paper's 0.7), to see which
suits plain SGD."""

MOMENTUM = 0.9
"""Momentum-SAM perturbs along the optimizer's momentum, so it and its own
baseline `sgdm` train with SGD momentum 0.9 at the schedule's rate times
(1 - 0.9): the same long-run step size as plain SGD at the schedule's rate."""
MSAM_RHO = 0.3
"""Momentum-SAM's rho (its code's default; its papers' rho is larger than SAM's)."""
MESA_KL_WEIGHT, MESA_TEMPERATURE, MESA_EMA_DECAY = 0.8, 5.0, 0.99
"""MESA's lambda and tau as in its paper; an EMA decay that averages over
about the last hundred steps, for the 750 (CNN) and 5,000 (MLP) steps of
this benchmark (the paper's 0.9998 is for ImageNet's 5,000 steps per epoch). The
term starts after 30% of the epochs, the paper's rule of thumb."""
MOMENTUM_METHODS = ("sgdm", "msam")
LATE_FRACTIONS = (0.1, 0.25, 0.5)
"""Late-phase SAM (Zhou et al., ICLR 2025): plain SGD first, SAM for this
fraction of the epochs at the end (`SAMModel(sam_start_epoch=...)`)."""

METHODS = {
    # name: label
    "sgd": "SGD",
    "sam": "SAM",
    "gsam": "GSAM",
    **{f"sam_every{k}": f"SAM every {k}" for k in SAM_EVERY},
    f"looksam{LOOKSAM_EVERY}": f"LookSAM every {LOOKSAM_EVERY}",
    **{
        f"looksam{LOOKSAM_EVERY}_alpha{a:g}": f"LookSAM every {LOOKSAM_EVERY} alpha {a:g}"
        for a in LOOKSAM_ALPHAS
    },
    "aesam": "AE-SAM",
    "mesa": "MESA",
    "sgdm": "SGD momentum",
    "msam": "Momentum-SAM",
    **{f"late{round(100 * f)}": f"SAM last {round(100 * f)}%" for f in LATE_FRACTIONS},
}


def sam_start_epoch(fraction, epochs):
    """The first SAM epoch of late-phase SAM for the last `fraction` of `epochs`."""
    return epochs - max(1, round(fraction * epochs))


def wrappers(args):
    """Method name -> function wrapping the network, as paper_run.train_one takes."""
    rho = protocol.RHO
    return {
        **paper_run.WRAPPERS,  # sgd, sam, gsam
        **{
            f"sam_every{k}": lambda inner, k=k: keras_sam.SAMModel(inner, rho=rho, sam_every=k)
            for k in SAM_EVERY
        },
        f"looksam{LOOKSAM_EVERY}": lambda inner: keras_sam.LookSAMModel(
            inner, rho=rho, sam_every=LOOKSAM_EVERY, alpha=LOOKSAM_ALPHA
        ),
        **{
            f"looksam{LOOKSAM_EVERY}_alpha{a:g}": lambda inner, a=a: keras_sam.LookSAMModel(
                inner, rho=rho, sam_every=LOOKSAM_EVERY, alpha=a
            )
            for a in LOOKSAM_ALPHAS
        },
        "aesam": lambda inner: keras_sam.AESAMModel(inner, rho=rho, threshold=args.aesam_threshold),
        "mesa": lambda inner: keras_sam.MESAModel(
            inner,
            kl_weight=MESA_KL_WEIGHT,
            temperature=MESA_TEMPERATURE,
            ema_decay=MESA_EMA_DECAY,
            kl_start_epoch=int(0.3 * args.epochs),
        ),
        "sgdm": lambda inner: inner,
        "msam": lambda inner: keras_sam.MSAMModel(inner, rho=MSAM_RHO),
        **{
            f"late{round(100 * f)}": lambda inner, f=f: keras_sam.SAMModel(
                inner, rho=rho, sam_start_epoch=sam_start_epoch(f, args.epochs)
            )
            for f in LATE_FRACTIONS
        },
    }


ONE_GRADIENT = ("sgd", "sgdm", "msam", "mesa")
"""Methods that never take SAM's second gradient (SAM steps: 0)."""


class _Scaled(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule times a constant."""

    def __init__(self, schedule, factor):
        self.schedule, self.factor = schedule, factor

    def __call__(self, step):
        return self.schedule(step) * self.factor


def optimizer_of(method):
    """`optimizer(lr)` for `paper_run.train_one`: the paper's plain SGD, or SGD
    momentum at (1 - momentum) times the rate for the momentum methods."""
    if method not in MOMENTUM_METHODS:
        return paper_run.plain_sgd

    def momentum_sgd(lr):
        factor = 1.0 - MOMENTUM
        lr = _Scaled(lr, factor) if callable(lr) else lr * factor
        return keras.optimizers.SGD(learning_rate=lr, momentum=MOMENTUM)

    return momentum_sgd


def label(method, args):
    if method == "aesam":
        return f"AE-SAM c={args.aesam_threshold:g}"
    return METHODS[method]


SCHEDULES = ("C", "constant", "linear", "BC")
"""The learning-rate (and batch) schedules of `benchmarks.paper` offered here:
BC is the batch ramp (doubling over 5 stages from `--initial-batch`) with
the cosine rate."""
ARCHITECTURES = ("mnist1d_cnn", "mnist1d_mlp")
"""The paper benchmark's two MNIST-1D networks: a CNN with BatchNorm, an MLP
without normalization."""
EPOCHS = {"mnist1d_cnn": 30, "mnist1d_mlp": 200}
"""Default epochs. The CNN's loss has stopped moving after 30 by the
convergence criterion, but it is not as flat or as accurate as after the
paper grid's 100 (and SAM's test error is still above SGD's), so its verdicts
are for this shorter training. The MLP learns slowly at lr 0.1 and gets the
paper grid's 200 (at 30 its test error is still above 50%)."""


# ---------------------------------------------------------------------------
# Command line.


def build_parser():
    p = argparse.ArgumentParser(
        prog=COMMAND,
        description="SGD, SAM, GSAM and cheaper SAM schedules on MNIST-1D: "
        "sharpness, test error, cost per step and a verdict per method.",
    )
    p.add_argument(
        "--methods",
        type=paper_cli._csv_choice("method", tuple(METHODS)),
        default=list(METHODS),
        help="comma separated, from " + ",".join(METHODS) + " (default all)",
    )
    p.add_argument(
        "--models",
        type=paper_cli._csv_choice("model", ARCHITECTURES),
        default=list(ARCHITECTURES),
        help="comma separated, from " + ",".join(ARCHITECTURES) + " (default both)",
    )
    p.add_argument(
        "--seeds", type=paper_cli._seeds, default=[0, 1, 2, 3, 4], help="default 0,1,2,3,4"
    )
    p.add_argument(
        "--epochs",
        type=paper_cli._positive_int,
        default=None,
        help="epochs of every run (default per architecture: "
        + ", ".join(f"{m} {e}" for m, e in EPOCHS.items())
        + ")",
    )
    p.add_argument(
        "--extend-until-converged",
        type=paper_cli._fraction,
        default=protocol.EXTEND_UNTIL_CONVERGED,
        help="a run whose training loss still moves after its epochs trains on "
        "until it stops, for at most this fraction of its epochs more "
        f"(default {protocol.EXTEND_UNTIL_CONVERGED}; 0: never)",
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="C",
        help="learning-rate schedule of benchmarks.paper (default C: cosine "
        "0.1 -> 0.001 per step, where SAM is clearly flatter than SGD)",
    )
    p.add_argument("--batch", type=paper_cli._positive_int, default=128, help="default 128")
    p.add_argument(
        "--initial-batch",
        type=paper_cli._positive_int,
        default=16,
        help="with --schedule BC: the first batch size, doubled 4 times (default 16)",
    )
    p.add_argument(
        "--num-samples",
        type=paper_cli._positive_int,
        default=4000,
        help="MNIST-1D examples in total, 80%% train (default 4000)",
    )
    p.add_argument("--sharpness-examples", type=paper_cli._positive_int, default=1024)
    p.add_argument("--sharpness-iterations", type=paper_cli._positive_int, default=20)
    p.add_argument(
        "--aesam-threshold",
        type=float,
        default=AESAM_THRESHOLD,
        help=f"AE-SAM's c (default {AESAM_THRESHOLD})",
    )
    p.add_argument("--out", default=os.path.join(protocol.RESULTS, "efficient"))
    return p


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_samples < 50:
        parser.error("--num-samples must be >= 50")
    # The fields paper_run.train_one and paper_run.run_config read.
    args.dataset, args.model, args.data_seed = "mnist1d", args.models[0], 0
    if args.schedule not in protocol.INCREASING:
        args.initial_batch = args.batch
    args.sharpness_every = 0
    return args


def for_model(args, model):
    """`args` for the runs of one architecture (its epochs)."""
    return argparse.Namespace(**dict(vars(args), model=model, epochs=args.epochs or EPOCHS[model]))


def run_config(args):
    """What a stored run must match to be reused (`args.model`'s runs)."""
    return dict(
        paper_run.run_config(args),
        schedule=args.schedule,
        looksam_alpha=LOOKSAM_ALPHA,
        aesam_threshold=args.aesam_threshold,
    )


# ---------------------------------------------------------------------------
# One run.


BLOCK_STEPS = 50
"""Steps per timing block: a multiple of every `sam_every` here, so each block
holds whole periods of the periodic schedules."""


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training step and of every epoch's steps."""

    def __init__(self):
        super().__init__()
        self.epochs = []
        self.spans = []  # per epoch: first step's begin to last step's end
        self._start = self._epoch_start = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append([])
        self._epoch_start = None

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()
        if self._epoch_start is None:
            self._epoch_start = self._start

    def on_train_batch_end(self, batch, logs=None):
        end = time.perf_counter()
        self.epochs[-1].append(end - self._start)
        span = end - self._epoch_start
        if len(self.spans) < len(self.epochs):
            self.spans.append(span)
        else:
            self.spans[-1] = span

    def ms_per_step(self):
        """Step time (ms) without the first epoch (it traces the step): the
        median over blocks of `BLOCK_STEPS` consecutive steps of their mean
        (robust to bursts of load from other processes); the plain mean when
        there are fewer steps than one block."""
        steps = [t for epoch in self.epochs[1:] or self.epochs for t in epoch]
        blocks = [
            steps[i : i + BLOCK_STEPS] for i in range(0, len(steps) - BLOCK_STEPS + 1, BLOCK_STEPS)
        ]
        if not blocks:
            return 1e3 * statistics.fmean(steps)
        return 1e3 * statistics.median(statistics.fmean(b) for b in blocks)

    def epoch_ms_per_step(self, phases=None):
        """Time per step as a user timing epochs sees it (ms): each epoch's
        wall time from its first step's start to its last step's end (the
        Python and input pipeline between steps included) over its steps.

        Epochs of one phase (`phases[e]`: the batch size and whether the
        epoch takes SAM steps) cost alike; the first epoch of a phase traces
        its step, so each phase's cost is the median over its epochs after
        the first (the first alone when it is the only one), and the run's
        cost is the phases' costs weighted by their steps. One phase (a
        constant batch, the same steps throughout): the median over the
        epochs after the first."""
        pairs = list(zip(self.spans, self.epochs))
        phases = list(phases or [None] * len(pairs))[: len(pairs)]
        groups = {}
        for phase, (span, steps) in zip(phases, pairs):
            groups.setdefault(phase, []).append((span, len(steps)))
        total_steps = sum(n for group in groups.values() for _, n in group)
        total = 0.0
        for group in groups.values():
            timed = group[1:] or group
            ms = statistics.median(span / n for span, n in timed)
            total += ms * sum(n for _, n in group)
        return 1e3 * total / total_steps


def train_one(args, data, method, seed):
    """One run of `args.model` (see `for_model`); its record."""
    timer = StepTimer()
    record = paper_run.train_one(
        args,
        data,
        method,
        args.schedule,
        seed,
        wrappers=wrappers(args),
        callbacks=[timer],
        optimizer=optimizer_of(method),
    )
    record["config"] = run_config(args)
    epochs = record["epochs"]
    phases = [(e.get("batch_size"), e.get("sam_fraction", 1.0) > 0) for e in epochs]
    record["final"]["ms_per_step"] = timer.ms_per_step()
    record["final"]["epoch_ms_per_step"] = timer.epoch_ms_per_step(phases)
    record["step_ms_per_epoch"] = [1e3 * statistics.fmean(e) for e in timer.epochs if e]
    # The share of SAM steps: each epoch's share weighted by its steps.
    if any("sam_fraction" in e for e in epochs):
        steps = [len(t) for t in timer.epochs][: len(epochs)]
        shared = sum(e.get("sam_fraction", 0.0) * n for e, n in zip(epochs, steps))
        record["final"]["sam_fraction"] = shared / sum(steps)
    else:
        record["final"]["sam_fraction"] = 0.0 if method in ONE_GRADIENT else 1.0
    return record


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


# ---------------------------------------------------------------------------
# Files.


def write_plot(args, runs, tables):
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = {m: [r for r in rows if r["cost"] is not None] for m, rows in tables.items()}
    tables = {m: rows for m, rows in tables.items() if rows}
    if not tables:
        return
    fig, axes = plt.subplots(len(tables), 2, figsize=(13, 5 * len(tables)), squeeze=False)
    for (model, rows), row_axes in zip(tables.items(), axes):
        for ax, key, name in (
            (row_axes[0], "fraction_kept", "fraction of SAM's sharpness reduction kept %"),
            (row_axes[1], "test_error", "test error %"),
        ):
            for r in rows:
                if key == "fraction_kept":
                    if r["fraction_kept"] is None:
                        continue
                    mean = 100 * r["fraction_kept"]
                    ci = r["kept_by_seed"][1]
                    yerr = (
                        [[max(mean - 100 * ci[0], 0)], [max(100 * ci[1] - mean, 0)]] if ci else None
                    )
                else:
                    mean, std = (100 * v for v in r[key])
                    yerr = std
                lo, hi = r["cost_range"]
                ax.errorbar(
                    r["cost"],
                    mean,
                    yerr=yerr,
                    xerr=[[r["cost"] - lo], [hi - r["cost"]]],
                    fmt="o",
                    capsize=3,
                    color="C2"
                    if r["verdict"] == YES
                    else "C0"
                    if r["verdict"] in (NOT_SETTLED, "—")
                    else "C3",
                )
                ax.annotate(
                    r["label"],
                    (r["cost"], mean),
                    fontsize=7,
                    xytext=(5, 4),
                    textcoords="offset points",
                )
            ax.axvline(COST, color="grey", ls=":", lw=1)
            ax.set_xlabel("cost per step / SGD (median over seeds; bars: range)")
            ax.set_title(f"{model}: {name} against cost", fontsize=10)
            ax.grid(alpha=0.3)
        row_axes[0].set_ylabel("kept % (from the means; bars: paired 95% interval by seed)")
        row_axes[1].set_ylabel("test error % (mean ± std over seeds)")
        row_axes[0].axhline(100 * KEEP, color="C2", ls=":", lw=1, label=f"{KEEP:.0%} kept")
        row_axes[0].legend(fontsize=7)
    seeds = ",".join(map(str, args.seeds))
    fig.suptitle(
        f"MNIST-1D, schedule {args.schedule}, {_epochs_text(args)}, seeds {seeds}; "
        "green: yes, red: no, blue: not settled or reference",
        fontsize=10,
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    paper_run.write_atomic(os.path.join(args.out, "sharpness_vs_cost.png"), buf.getvalue())


def _load_range(runs):
    loads = [r["load_average"] for r in runs if "load_average" in r]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "not recorded"


def runs_markdown(runs):
    """One line per run: its length and the convergence test."""
    lines = [
        paper_report.CONVERGENCE_RULE + ".",
        "",
        "| model | method | seed | epochs | final train loss | change over the last "
        "10% | tolerance | converged | test error % | worst-case sharpness | "
        "ms per step (epochs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        c = verdicts.convergence_of(r["epochs"])
        f = r["final"]
        lines.append(
            f"| {r['config']['model']} | {r['method']} | {r['seed']} | {len(r['epochs'])} | "
            f"{r['epochs'][-1]['train_loss']:.4f} | {c['change']:.4f} | {c['tolerance']:.4f} | "
            f"{'yes' if c['converged'] else '**no**'} | {100 * f['test_error']:.2f} | "
            f"{f['worst_case_sharpness']:.3g} | {f['epoch_ms_per_step']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _epochs_text(args):
    return ", ".join(f"{for_model(args, m).epochs} epochs ({m})" for m in args.models)


def schedule_text(args):
    """The schedule in words (its batch sizes and rate)."""
    return protocol.SCHEDULE_TEXT[args.schedule].format(
        batch=args.batch,
        b0=args.initial_batch,
        bmax=args.initial_batch * 2 ** (protocol.STAGES - 1),
    )


def write_report(args, runs, argv_used, total, wall_s):
    tables = summarize(args, runs)
    cmd = COMMAND + (" " + " ".join(shlex.quote(a) for a in argv_used) if argv_used else "")
    machine = paper_report.machine_description()
    markdown = {m: table_markdown(rows) for m, rows in tables.items()}
    verdict_table = verdict_markdown(args, tables)
    notes = guidance(args, tables)
    run_s = sum(r.get("run_time_s", 0.0) for r in runs)
    converged = sum(verdicts.convergence_of(r["epochs"])["converged"] for r in runs)
    protocol_text = (
        f"{', '.join(args.models)}, plain SGD (no momentum), lr schedule "
        f"{args.schedule} ({schedule_text(args)}), "
        f"rho {protocol.RHO} for every SAM variant, GSAM alpha {protocol.ALPHA}, "
        f"LookSAM alpha {LOOKSAM_ALPHA} (and {', '.join(map(str, LOOKSAM_ALPHAS))} where named), "
        f"AE-SAM threshold c {args.aesam_threshold:g} (decay 0.9); MESA lambda "
        f"{MESA_KL_WEIGHT:g}, tau {MESA_TEMPERATURE:g}, EMA decay {MESA_EMA_DECAY:g}, "
        "the term after 30% of the epochs; late-phase SAM (SAM last 10/25/50%): plain SGD, then "
        "SAM from the epoch that leaves that fraction of the epochs; SGD momentum and Momentum-SAM "
        f"(rho {MSAM_RHO:g}): SGD momentum {MOMENTUM:g} at {1 - MOMENTUM:g}x the rate; "
        f"{_epochs_text(args)} (up to {args.extend_until_converged:.0%} more while the "
        f"training loss still moves), num_samples {args.num_samples}, "
        f"seeds {','.join(map(str, args.seeds))}"
    )
    md = [
        "# Cheaper SAM on MNIST-1D (`benchmarks/efficient.py`)",
        "",
        f"- command: `{cmd}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {machine}; load average (1 min) at the end of the runs {_load_range(runs)}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in paper_report.versions().items()),
        f"- completed runs: {len(runs)} / {total}, {converged} converged (`runs.md`); wall "
        f"time of this invocation {wall_s:.0f} s; all completed runs (training + measures) "
        f"{run_s:.0f} s",
        f"- protocol: {protocol_text}",
        "- cost per step / SGD: each epoch's wall time from its first step's start to its "
        "last step's end over its steps (what a user timing epochs sees); epochs of one "
        "phase (batch size, SAM steps or not) cost the median of that phase's epochs "
        "after its first (which traces its step), the run the phases weighted by their "
        "steps; divided by SGD's of the same seed; the median and the range over seeds. "
        "Every step is one call of the compiled function, so `sam_every` and LookSAM run "
        "the kind of step chosen on the host. SAM steps: the measured share of two-gradient "
        "steps. Worst-case sharpness (L-inf Auto-PGD, rho "
        f"{protocol.SHARPNESS_RHO}, {args.sharpness_iterations} iterations, first "
        f"{args.sharpness_examples} training examples) and full-gradient norm: as "
        "benchmarks.paper, after the last epoch; mean ± std over seeds.",
        "- fraction kept: (sharp_SGD - sharp_method) / (sharp_SGD - sharp_SAM), from the "
        "means; by seed: the same with the runs of one seed (same initialization and data "
        "order), mean and Student-t 95% interval over seeds. vs SGD, vs SAM: test error "
        "minus SGD's (SAM's), paired by seed, mean and 95% interval in percentage points; "
        "a method costs accuracy when both intervals lie above 0.",
        f'- verdict, "keeps >= {KEEP:.0%} at <= {COST}x without costing accuracy": '
        f"**no** when the median cost is above {COST}x, the fraction's interval lies below "
        f"{KEEP:.0%} or the method costs accuracy; **yes** when the cost is within {COST}x, "
        f"the fraction's interval lies at or above {KEEP:.0%}, the method does not cost "
        "accuracy and every run converged; **not settled** otherwise.",
        "",
        "## Verdicts",
        "",
        verdict_table,
        *[f"- {line}" for line in notes],
        "",
        "![fraction of SAM's reduction kept and test error against cost](sharpness_vs_cost.png)",
        "",
    ]
    for model, text in markdown.items():
        md += [f"## {model}", "", text]
    paper_run.write_atomic(os.path.join(args.out, "results.md"), "\n".join(md))
    paper_run.write_atomic(
        os.path.join(args.out, "runs.md"),
        "# Runs of `benchmarks/efficient.py`\n\n" + runs_markdown(runs),
    )
    summary = {
        "command": cmd,
        "machine": machine,
        "versions": paper_report.versions(),
        "config": {m: run_config(for_model(args, m)) for m in args.models},
        "wall_s": wall_s,
        "runs_s": run_s,
        "runs": len(runs),
        "converged": converged,
        "protocol": protocol_text,
        "tables": tables,
        "markdown": markdown,
        "verdicts": verdict_rows(args, tables),
        "verdict_table": verdict_table,
        "guidance": notes,
    }
    paper_run.write_atomic(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=1))
    write_plot(args, runs, tables)


# ---------------------------------------------------------------------------
# Main.


def main(argv=None):
    argv_used = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv_used)
    runs_dir = os.path.join(args.out, "runs")
    per_model = {m: for_model(args, m) for m in args.models}
    configs = {m: run_config(a) for m, a in per_model.items()}
    # Seeds outermost, then architectures, methods interleaved: machine drift
    # hits all methods alike.
    grid = [(model, m, s) for s in args.seeds for model in args.models for m in args.methods]

    def path_of(model, method, seed):
        name = paper_run.run_name(method, args.schedule, seed)
        return paper_run.named_run_path(os.path.join(runs_dir, model), name)

    for model in args.models:
        os.makedirs(os.path.join(runs_dir, model), exist_ok=True)
    data = None
    stats = {"trained": 0, "skipped": 0}
    t_start = time.perf_counter()
    try:
        for i, (model, method, seed) in enumerate(grid, 1):
            head = f"[{i}/{len(grid)}] {model} {label(method, args)} seed={seed}"
            if paper_run.load_run(path_of(model, method, seed), configs[model]) is not None:
                stats["skipped"] += 1
                paper_cli._progress(f"{head}: done before, skipped")
                continue
            if data is None:
                data = paper_data.Data("mnist1d", args.num_samples, args.data_seed)
            t0 = time.perf_counter()
            record = train_one(per_model[model], data, method, seed)
            record["run_time_s"] = time.perf_counter() - t0
            record["load_average"] = os.getloadavg()[0]  # 1 min, at the end of the run
            paper_run.store_run(path_of(model, method, seed), record)
            stats["trained"] += 1
            f = record["final"]
            c = verdicts.convergence_of(record["epochs"])
            paper_cli._progress(
                f"{head}: test error {100 * f['test_error']:.2f}%, sharpness "
                f"{f['worst_case_sharpness']:.3g}, {f['epoch_ms_per_step']:.1f} ms/step, "
                f"SAM steps {f['sam_fraction']:.2f}, {len(record['epochs'])} epochs, "
                f"converged {'yes' if c['converged'] else 'no'}, "
                f"{record['run_time_s']:.0f} s, load average {record['load_average']:.1f}"
            )
    finally:
        # The report covers the finished runs on disk; a run in progress never counts.
        finished = []
        for model, method, seed in grid:
            try:
                record = paper_run.load_run(path_of(model, method, seed), configs[model])
            except SystemExit:
                record = None
            if record is not None:
                finished.append(record)
        if finished:
            write_report(args, finished, argv_used, len(grid), time.perf_counter() - t_start)
    paper_cli._progress(
        f"trained {stats['trained']}, skipped {stats['skipped']} of "
        f"{len(grid)} runs in {time.perf_counter() - t_start:.0f} s; "
        f"results in {args.out}"
    )
    return stats


if __name__ == "__main__":
    main()
