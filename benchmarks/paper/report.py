"""The report of a grid: `results.md`, `runs.json` and the PNG plots.

Everything here is derived from the stored runs (`<out>/runs/*.json`), so the
report can be rebuilt without training, e.g. after a change of the tables:

    python -m benchmarks.paper.report --out benchmarks/results/mnist1d

The header (command, date, machine, versions, wall time, the grid) is kept
from the folder's `runs.json` when it was made with the same configuration;
what it lacks describes this invocation (the date of the rebuild, a command
that reruns the stored grid, the grid the stored runs cover).
"""

import argparse
import datetime
import io
import json
import math
import os
import platform
import shlex
import statistics
import sys

import keras
import numpy as np

import keras_sam
from benchmarks.paper import run as run_lib
from benchmarks.paper import verdicts as verdicts_lib
from benchmarks.paper.protocol import COMMAND
from benchmarks.paper.protocol import METHODS
from benchmarks.paper.protocol import NOISE_SCALE
from benchmarks.paper.protocol import SCHEDULE_TEXT
from benchmarks.paper.protocol import SCHEDULES
from benchmarks.paper.protocol import SHARPNESS_BATCH
from benchmarks.paper.protocol import STAGES
from benchmarks.paper.protocol import STEPS_CONTROL


def _mean_std(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _fmt(mean, std, scale=1.0, digits=2):
    if mean is None:
        return "—"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _fmt_sci(mean, std):
    if mean is None:
        return "—"
    return f"{mean:.3g} ± {std:.2g}"


def summarize(args, runs):
    """Rows (method, schedule, stats) in grid order, from completed runs."""
    rows = []
    for method in args.methods:
        for schedule in args.schedules:
            rs = [r for r in runs if r["method"] == method and r["schedule"] == schedule]
            f = [r["final"] for r in rs]
            rows.append(
                {
                    "method": method,
                    "schedule": schedule,
                    "n": len(rs),
                    "test_error": _mean_std([x["test_error"] for x in f]),
                    "sharpness": _mean_std([x["worst_case_sharpness"] for x in f]),
                    "grad_norm": _mean_std([x["full_gradient_norm"] for x in f]),
                    "train_loss": _mean_std([x["train_loss"] for x in f]),
                    "time": _mean_std([x["train_time_s"] for x in f]),
                    "epochs": sorted({len(r["epochs"]) for r in rs}),
                    "steps": sorted({sum(r["steps_per_epoch"]) for r in rs}),
                    "examples": sorted({r.get("examples") for r in rs} - {None}),
                    "converged": sum(convergence(r)["converged"] for r in rs),
                }
            )
    return rows


def convergence(record):
    """`verdicts.convergence` of a run's per-epoch training losses."""
    return verdicts_lib.convergence_of(record["epochs"])


def _one(values):
    return "—" if not values else "/".join(f"{v:,}" for v in values)


def table_markdown(rows):
    lines = [
        "| method | schedule | runs | test error % | worst-case sharpness | "
        "full-gradient norm | final train loss | converged | epochs | steps | "
        "examples seen | train time s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['schedule']} | {r['n']} | "
            f"{_fmt(*r['test_error'], scale=100)} | {_fmt_sci(*r['sharpness'])} | "
            f"{_fmt_sci(*r['grad_norm'])} | {_fmt(*r['train_loss'], digits=3)} | "
            f"{r['converged']}/{r['n']} | {_one(r['epochs'])} | {_one(r['steps'])} | "
            f"{_one(r['examples'])} | {_fmt(*r['time'], digits=1)} |"
        )
    return "\n".join(lines) + "\n"


def _interval(c, scale=1.0, digits=2):
    lo, hi = c["ci"] if c["ci"] else (None, None)
    if lo is None:
        return "—"
    return f"[{lo * scale:+.{digits}f}, {hi * scale:+.{digits}f}]"


def verdict_markdown(results):
    """The claims table: one line per claim and one per comparison."""
    lines = [
        "| claim | comparison (a vs b) | mean a | mean b | a − b (ratio: geometric "
        "mean of a/b) | 95% CI | p | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in results:
        present = len(v["comparisons"])
        count = f"{present} comparisons" + (
            f" (of {v['total']}; the grid lacks the others)" if present < v["total"] else ""
        )
        lines.append(f"| **{v['claim']}** | {count} | | | | | | **{v['verdict']}** |")
        for c in v["comparisons"]:
            name = f"{' '.join(c['a'])} vs {' '.join(c['b'])}"
            if v["metric"] == "worst_case_sharpness":
                diff = f"{c['mean_a'] - c['mean_b']:+.3g} (ratio {c['ratio']:.3g})"
                ci = (
                    "—"
                    if c["ratio_ci"] is None
                    else f"ratio [{c['ratio_ci'][0]:.3g}, {c['ratio_ci'][1]:.3g}]"
                )
                ma, mb = f"{c['mean_a']:.3g}", f"{c['mean_b']:.3g}"
            elif v["metric"] in COUNTS:
                diff = f"{c['mean_difference']:+.0f}"
                ci = _interval(c, digits=0) if c["ci"] else "—"
                ma, mb = f"{c['mean_a']:.0f}", f"{c['mean_b']:.0f}"
            else:
                diff = f"{100 * c['mean_difference']:+.2f} pp"
                ci = _interval(c, scale=100) + " pp" if c["ci"] else "—"
                ma, mb = f"{100 * c['mean_a']:.2f}%", f"{100 * c['mean_b']:.2f}%"
            p = "—" if c["p"] is None else f"{c['p']:.2g}"
            if c.get("left_out"):
                name += f", {c['left_out']} seed(s) left out (not finite or 0)"
            if c["n"] == 0:
                lines.append(f"| | {name} (n=0) | — | — | — | — | — | {c['verdict']} |")
                continue
            lines.append(
                f"| | {name} (n={c['n']}) | {ma} | {mb} | {diff} | {ci} | {p} | {c['verdict']} |"
            )
    return "\n".join(lines) + "\n"


COUNTS = ("steps", "examples")
"""Metrics compared as counts (optimizer steps, training examples seen)."""

VERDICT_RULE = (
    "Each comparison pairs the two settings seed by seed (same seed: same "
    "initial weights and data order) and takes a Student-t 95% confidence "
    "interval of the mean difference (sharpness: of log(a) − log(b), shown as "
    "the ratio a/b; test error: in percentage points) and the paired t-test's "
    "two-sided p. A comparison is *reproduced* when the interval lies on the "
    "side the paper claims, *not reproduced* when it lies on the other side, "
    "*not settled* when it contains 0 (no difference). A claim is reproduced "
    "when all its comparisons are, not reproduced when none is and at least "
    "one is on the other side, else not settled. The grown batches' claims "
    "(at least as flat, no more steps or examples, a test error no higher) "
    "hold where the interval lies at or below 0 (equal step counts in every "
    'pair meet "no more") and fail where it lies above. Each line is its '
    "own 95% interval: among many lines, one may fall on a side by chance."
)

CONVERGENCE_RULE = (
    "converged: the epoch-mean training loss changed by less than 5% or by "
    "less than 0.01 (whichever is larger) over the last 10% of the epochs, "
    "|L(E) − L(E − w)| < max(0.05·L(E − w), 0.01) with w = max(1, round(0.1·E)); "
    "`runs.md` lists it per run"
)


def runs_markdown(runs):
    """One line per run: length, final loss and the convergence test."""
    lines = [
        "| run | epochs | steps | examples seen | final train loss | change over "
        "last 10% | tolerance | converged | test error % | worst-case sharpness |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        c = convergence(r)
        lines.append(
            f"| {r['name']} | {len(r['epochs'])} | {sum(r['steps_per_epoch']):,} | "
            f"{r.get('examples', 0):,} | {r['final']['train_loss']:.4f} | "
            f"{c['change']:.4f} ({100 * c['relative_change']:.1f}%) | "
            f"{c['tolerance']:.4f} | {'yes' if c['converged'] else '**no**'} | "
            f"{100 * r['final']['test_error']:.2f} | "
            f"{r['final']['worst_case_sharpness']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def machine_description():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = f"{platform.node()}: {platform.platform()}, {cpu}, {os.cpu_count()} CPU(s)"
    if gpus:
        text += f", GPUs: {', '.join(g.name for g in gpus)}"
    else:
        text += ", no GPU"
    return text


def versions():
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "keras_sam": keras_sam.__version__,
        "backend": keras.backend.backend(),
    }


def now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def header(args, argv_used, total, wall_s, trained):
    """What the report says about the invocation that made it: its command,
    date, machine, versions, wall time and how many runs of this model it
    trained (`trained`; the others were stored before)."""
    return {
        "command": COMMAND
        + (" " + " ".join(shlex.quote(a) for a in argv_used) if argv_used else ""),
        "date": now(),
        "machine": machine_description(),
        "versions": versions(),
        "wall_s": wall_s,
        "trained": trained,
        "grid": {
            "methods": list(args.methods),
            "schedules": list(args.schedules),
            "seeds": list(args.seeds),
            "total": total,
        },
    }


def with_stored_runs(args, runs):
    """`args` and `runs` grown by the other runs stored in `args.out/runs`
    with the same configuration, so that a grid run into a folder that
    holds more (other schedules, methods or seeds) reports them all instead
    of replacing the report with its own part."""
    config = runs[0]["config"]
    names = {r["name"] for r in runs}
    more = [
        r
        for r in run_lib.stored_runs(os.path.join(args.out, "runs"))
        if r["name"] not in names
        and r["config"] == config
        and r["method"] in METHODS
        and r["schedule"] in SCHEDULES
    ]
    if not more:
        return args, runs
    runs = runs + more
    return argparse.Namespace(**{**vars(args), **grid_of(runs)}), runs


def grid_of(runs):
    """The methods, schedules (in the grid's order) and seeds of `runs`."""
    return {
        "methods": [m for m in METHODS if any(r["method"] == m for r in runs)],
        "schedules": [s for s in SCHEDULES if any(r["schedule"] == s for r in runs)],
        "seeds": sorted({r["seed"] for r in runs}),
    }


HEADER_KEYS = ("command", "date", "machine", "versions", "wall_s", "trained")


def stored_header(out, config):
    """The header kept in `out/runs.json` when it was made with `config`
    (else None): an invocation that trained nothing keeps the header of the
    one that trained the runs."""
    stored = run_lib.read_run(os.path.join(out, "runs.json"))
    if isinstance(stored, dict) and stored.get("config") == config:
        return {key: stored[key] for key in HEADER_KEYS + ("grid",) if key in stored}
    return None


def write_report(args, runs, head):
    """Writes `results.md`, `runs.md`, `runs.json` (the header, the verdicts
    and each run without its per-epoch records, which stay in `runs/`) and
    the plots of `runs` (finished runs of one configuration) into
    `args.out`; `head` from `header`."""
    out = args.out
    config = runs[0]["config"]
    rows = summarize(args, runs)
    v = head["versions"]
    wall_s = head.get("wall_s")
    control = [len(r["epochs"]) for r in runs if r["schedule"] == STEPS_CONTROL]
    fmt = dict(
        batch=args.batch,
        b0=args.initial_batch,
        bmax=args.initial_batch * 2 ** (STAGES - 1),
        control_epochs=control[0] if control else "?",
        threshold=config["adaptive_threshold"],
        patience=config["plateau_patience"],
        min_delta=config["plateau_min_delta"],
    )
    runs = sorted(
        runs,
        key=lambda r: (
            args.methods.index(r["method"]),
            args.schedules.index(r["schedule"]),
            r["seed"],
        ),
    )
    results = verdicts_lib.verdicts(runs)
    converged = sum(convergence(r)["converged"] for r in runs)
    # With runs that missed the criterion: the verdicts once more without them
    # (their seeds drop out of the comparisons they are in), beside the main ones.
    unconverged = [r["name"] for r in runs if not convergence(r)["converged"]]
    results_converged = (
        verdicts_lib.verdicts([r for r in runs if convergence(r)["converged"]])
        if unconverged
        else None
    )
    threads = sorted({r.get("intra_op_threads") for r in runs} - {None})
    md = [
        f"# Paper benchmark: {args.dataset} / {args.model}",
        "",
        f"- command: `{head['command']}`",
        f"- date: {head['date']}",
        f"- machine: {head['machine']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- completed runs: {len(runs)} / {head['grid']['total']}"
        + (f"; wall time of this invocation {wall_s:.0f} s" if wall_s is not None else "")
        + (
            f" (it trained {head['trained']} of them; the wall time covers every "
            "model of the invocation)"
            if head.get("trained") is not None
            else ""
        ),
        f"- protocol: plain SGD (no momentum, no weight decay), lr {config['lr']}, "
        f"SAM/GSAM rho {config['rho']} (constant), GSAM alpha {config['alpha']}, "
        f"cross-entropy, last partial batch dropped; {args.epochs} epochs"
        + (
            f" (a run whose training loss still moves then trains on at its final "
            f"batch size and rate until it stops, for at most "
            f"{config.get('extend_until_converged', 0.0):.0%} more epochs)"
            if config.get("extend_until_converged")
            else ""
        )
        + "; "
        f"{'num_samples ' + str(args.num_samples) + ', ' if args.num_samples else ''}"
        f"seeds {','.join(map(str, args.seeds))}",
        "- schedules: "
        + "; ".join(f"{s}: {SCHEDULE_TEXT[s].format(**fmt)}" for s in args.schedules),
        f"- test error: after the last epoch; worst-case sharpness: L-inf Auto-PGD, "
        f"rho {config['sharpness_rho']}, {args.sharpness_iterations} iterations, first "
        f"{args.sharpness_examples} training examples in batches of "
        f"{SHARPNESS_BATCH}, inference mode; full-gradient norm: "
        "||grad f_S(w)|| over the whole training set (no augmentation), "
        "inference mode. Train time: wall clock of `fit` (incl. per-epoch test "
        "evaluation and tracing). Mean ± std over seeds.",
        f"- {CONVERGENCE_RULE}: **{converged} of {len(runs)} runs converged**.",
        "- controls of B: `constant` sees as many examples as B (same epochs), "
        "`constant_steps` takes as many optimizer steps (whole epochs, so up to "
        "one epoch more); the table's steps and examples columns give the counts.",
        "- TensorFlow intra-op threads per run: "
        + (
            ", ".join("default (one per core)" if t == 0 else str(t) for t in threads)
            or "not recorded"
        )
        + ".",
        "",
        table_markdown(rows),
        "## The paper's claims",
        "",
        VERDICT_RULE,
        "",
        verdict_markdown(results),
    ]
    if unconverged:
        md += [
            "## The claims without the runs that did not converge",
            "",
            f"Left out: {', '.join(unconverged)} (see `runs.md`); the other seeds "
            "of the comparisons they are in stay.",
            "",
            verdict_markdown(results_converged),
        ]
    run_lib.write_atomic(os.path.join(out, "results.md"), "\n".join(md))
    run_lib.write_atomic(
        os.path.join(out, "runs.md"),
        "\n".join(
            [
                f"# Runs of {args.dataset} / {args.model}",
                "",
                f"{CONVERGENCE_RULE}.",
                "",
                runs_markdown(runs),
            ]
        ),
    )
    summary = {
        "command": head["command"],
        "versions": v,
        "machine": head["machine"],
        "config": config,
        "date": head["date"],
        "wall_s": wall_s,
        "trained": head.get("trained"),
        "grid": head["grid"],
        "converged": converged,
        "verdicts": results,
        "unconverged": unconverged,
        "verdicts_converged": results_converged,
        # Each run without its per-epoch records (those are in runs/<name>.json
        # only), with its convergence test.
        "runs": [
            dict(
                {k: v for k, v in r.items() if k != "epochs"},
                epochs_trained=len(r["epochs"]),
                convergence=convergence(r),
            )
            for r in runs
        ],
    }
    run_lib.write_atomic(os.path.join(out, "runs.json"), json.dumps(summary, indent=1))
    write_plots(args, runs)
    write_verdict_plot(args, results)


def write_plots(args, runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sgd": "tab:blue", "sam": "tab:orange", "gsam": "tab:green"}
    styles = {
        "constant": "-",
        "B": "--",
        "C": ":",
        "BC": "-.",
        "linear": (0, (5, 1, 1, 1, 1, 1)),
        STEPS_CONTROL: (0, (1, 3)),
        "adaptive": (0, (3, 1, 1, 1)),
        "adaptive_C": (0, (1, 1)),
        "B_measured": (0, (8, 2)),
        "plateau": (0, (6, 2, 1, 2)),
        "plateau_C": (0, (2, 2)),
    }
    groups = []
    for method in args.methods:
        for schedule in args.schedules:
            rs = [r for r in runs if r["method"] == method and r["schedule"] == schedule]
            if rs:
                groups.append((method, schedule, rs))
    if not groups:
        return

    save = _saver(plt, args.out)

    curves = [
        ("train_loss", "training loss", True, "train_loss.png"),
        ("test_error", "test error", False, "test_error.png"),
        ("batch_size", "batch size", True, "batch_size.png"),
        ("learning_rate", "learning rate (end of epoch)", True, "learning_rate.png"),
    ]
    for key, label, log, fname in curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method, schedule, rs in groups:
            n = min(len(r["epochs"]) for r in rs)
            ys = np.array([[e[key] for e in r["epochs"][:n]] for r in rs], float)
            ax.plot(
                range(1, n + 1),
                ys.mean(axis=0),
                color=colors[method],
                linestyle=styles[schedule],
                label=f"{method} {schedule}",
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.set_title(f"{label} ({args.dataset}, mean over seeds)")
        ax.legend(fontsize=7, ncol=3)
        ax.grid(alpha=0.3)
        save(fig, fname)

    for key, label, fname in (
        ("worst_case_sharpness", "worst-case sharpness", "sharpness.png"),
        ("full_gradient_norm", "full-gradient norm", "grad_norm.png"),
    ):
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(groups) + 2), 4.5))
        means, stds, labels, cols = [], [], [], []
        for method, schedule, rs in groups:
            vals = [r["final"][key] for r in rs]
            means.append(np.mean(vals))
            stds.append(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
            labels.append(f"{method}\n{schedule}")
            cols.append(colors[method])
        ax.bar(range(len(means)), means, yerr=stds, color=cols, capsize=3)
        ax.set_xticks(range(len(means)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.set_title(f"{label} after training ({args.dataset}, mean ± std over seeds)")
        ax.grid(alpha=0.3, axis="y")
        save(fig, fname)
    write_noise_scale_plot(args, groups, colors, styles, save)


def write_noise_scale_plot(args, groups, colors, styles, save):
    """`noise_scale.png`: the batch size and the measured noise scale over
    the epochs, for the grown batches (noise-scale and plateau rules) and B
    (the runs with the estimate; median over seeds)."""
    shown = [g for g in groups if g[1] in NOISE_SCALE + ("B",)]
    if not any(g[1] in NOISE_SCALE for g in shown):
        return
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    for method, schedule, rs in shown:
        n = min(len(r["epochs"]) for r in rs)
        style = dict(color=colors[method], linestyle=styles[schedule], label=f"{method} {schedule}")
        sizes = np.array([[e["batch_size"] for e in r["epochs"][:n]] for r in rs], float)
        top.plot(range(1, n + 1), np.median(sizes, axis=0), **style)
        if schedule in NOISE_SCALE:
            noise = np.array([[e["noise_scale"] for e in r["epochs"][:n]] for r in rs], float)
            bottom.plot(range(1, n + 1), np.median(noise, axis=0), **style)
    threshold = rs[0]["config"].get("adaptive_threshold", 1.0)
    top.set_ylabel("batch size")
    top.set_yscale("log", base=2)
    top.set_title(
        f"batch size and measured noise scale B_simple ({args.dataset} / {args.model}, "
        f"median over seeds); adaptive doubles at an epoch's end when B_simple >= "
        f"{threshold:g} x batch, plateau when the training loss has stalled",
        fontsize=8,
    )
    bottom.set_ylabel("noise scale B_simple")
    bottom.set_yscale("log")
    bottom.set_xlabel("epoch")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
    save(fig, "noise_scale.png")


def _saver(plt, out):
    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        run_lib.write_atomic(os.path.join(out, name), buf.getvalue())

    return save


def write_verdict_plot(args, results):
    """`verdicts.png`: every comparison's mean difference and 95% interval,
    one panel per metric, coloured by its verdict."""
    if not results:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        verdicts_lib.REPRODUCED: "tab:green",
        verdicts_lib.NOT_REPRODUCED: "tab:red",
        verdicts_lib.NOT_SETTLED: "tab:gray",
    }
    panels = [
        ("worst_case_sharpness", "sharpness ratio a/b (log scale)"),
        ("test_error", "test error a − b (percentage points)"),
        ("steps", "optimizer steps a − b"),
        ("examples", "training examples a − b"),
    ]
    panels = [(k, label) for k, label in panels if any(v["metric"] == k for v in results)]
    heights = [
        sum(len(v["comparisons"]) + 1 for v in results if v["metric"] == k) for k, _ in panels
    ]
    fig, axes = plt.subplots(
        len(panels),
        1,
        squeeze=False,
        figsize=(8, 0.22 * sum(heights) + 1.5),
        gridspec_kw={"height_ratios": heights},
    )
    for ax, (metric, label) in zip(axes[:, 0], panels):
        y, ticks, names = 0, [], []
        for v in results:
            if v["metric"] != metric:
                continue
            ticks.append(y)
            names.append(f"{v['claim']}: {v['verdict']}")
            y -= 1
            for c in v["comparisons"]:
                if metric == "worst_case_sharpness":
                    mid = c["ratio"]
                    lo, hi = c["ratio_ci"] if c["ratio_ci"] else (mid, mid)
                else:
                    scale = 1 if metric in COUNTS else 100
                    mid = scale * c["mean_difference"]
                    lo, hi = (scale * c["ci"][0], scale * c["ci"][1]) if c["ci"] else (mid, mid)
                ax.errorbar(
                    [mid],
                    [y],
                    xerr=[[mid - lo], [hi - mid]],
                    fmt="o",
                    color=colors[c["verdict"]],
                    capsize=2,
                    markersize=3,
                )
                ticks.append(y)
                names.append(f"{' '.join(c['a'])} vs {' '.join(c['b'])}")
                y -= 1
        ax.axvline(1.0 if metric == "worst_case_sharpness" else 0.0, color="black", linewidth=0.8)
        if metric == "worst_case_sharpness":
            ax.set_xscale("log")
        ax.set_yticks(ticks)
        ax.set_yticklabels(names, fontsize=6)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, axis="x")
    axes[0, 0].set_title(
        f"the paper's claims, {args.dataset} / {args.model} "
        "(green reproduced, red not reproduced, grey not settled)",
        fontsize=8,
    )
    _saver(plt, args.out)(fig, "verdicts.png")


def model_folders_with_reports(root):
    """The subfolders of a grid folder that hold a model's report."""
    return [
        os.path.join(root, d)
        for d in sorted(os.listdir(root))
        if os.path.exists(os.path.join(root, d, "runs.json"))
    ]


def write_summary(out, model_dirs):
    """`<out>/summary.md` and `summary.json`: each claim's verdict for each
    model of the grid, from the model folders' `runs.json`."""
    models, columns, by_claim = [], [], {}

    def cell(v):
        words = [c["verdict"] for c in v["comparisons"]]
        total = v.get("total", len(words))
        return (
            f"{v['verdict']} ({sum(w == verdicts_lib.REPRODUCED for w in words)}"
            f" of {len(words)} reproduced"
            + (f"; {total - len(words)} not in the grid" if total > len(words) else "")
            + ")"
        )

    for folder in model_dirs:
        stored = run_lib.read_run(os.path.join(folder, "runs.json"))
        if not isinstance(stored, dict) or "verdicts" not in stored:
            continue
        model = stored["config"]["model"]
        models.append((model, stored))
        views = [(model, stored["verdicts"])]
        if stored.get("verdicts_converged"):
            views.append((f"{model}, converged runs only", stored["verdicts_converged"]))
        for column, results in views:
            columns.append(column)
            for v in results:
                by_claim.setdefault(v["claim"], {})[column] = cell(v)
    if not models:
        return None
    lines = ["| claim | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for claim, cells in by_claim.items():
        lines.append(f"| {claim} | " + " | ".join(cells.get(c, "—") for c in columns) + " |")
    conv = ", ".join(
        f"{m}: {s['converged']}/{len(s['runs'])}"
        + (f" (not: {', '.join(s['unconverged'])})" if s.get("unconverged") else "")
        for m, s in models
    )
    text = "\n".join(lines) + (
        f"\n\nRuns meeting the convergence criterion: {conv}. Seeds per setting: "
        + ", ".join(f"{m}: {','.join(map(str, s['grid']['seeds']))}" for m, s in models)
        + ". The comparisons behind each cell, the tables and the plots: "
        + ", ".join(f"`{os.path.relpath(os.path.join(f, 'results.md'), out)}`" for f in model_dirs)
        + ".\n"
    )
    run_lib.write_atomic(os.path.join(out, "summary.md"), text)
    run_lib.write_atomic(
        os.path.join(out, "summary.json"),
        json.dumps(
            {"models": [m for m, _ in models], "columns": columns, "verdicts": by_claim}, indent=1
        ),
    )
    return text


# ---------------------------------------------------------------------------
# Rebuilding the report from the stored runs.


def _rerun_command(config, grid, out):
    """A command line that reruns (or, with the runs stored, skips) the grid."""
    argv = [
        "--dataset",
        config["dataset"],
        "--model",
        config["model"],
        "--methods",
        ",".join(grid["methods"]),
        "--schedules",
        ",".join(grid["schedules"]),
        "--seeds",
        ",".join(map(str, grid["seeds"])),
        "--epochs",
        str(config["epochs"]),
        "--batch",
        str(config["batch"]),
        "--initial-batch",
        str(config["initial_batch"]),
    ]
    if config["num_samples"] is not None:
        argv += ["--num-samples", str(config["num_samples"])]
    if config["data_seed"] is not None:
        argv += ["--data-seed", str(config["data_seed"])]
    argv += ["--extend-until-converged", f"{config.get('extend_until_converged', 0.0):g}"]
    argv += [
        "--sharpness-examples",
        str(config["sharpness_examples"]),
        "--sharpness-iterations",
        str(config["sharpness_iterations"]),
    ]
    if config["sharpness_every"]:
        argv += ["--sharpness-every", str(config["sharpness_every"])]
    argv += ["--out", os.path.dirname(os.path.normpath(out)) or "."]
    command = COMMAND + " " + " ".join(shlex.quote(a) for a in argv)
    if os.path.basename(os.path.normpath(out)) != config["model"]:
        command += f" (the grid writes to <out>/{config['model']}; these runs are in {out})"
    return command


def rebuild(out):
    """Rewrites the report of `out` from `out/runs/*.json`; returns the
    number of runs it covers."""
    runs = run_lib.stored_runs(os.path.join(out, "runs"))
    if not runs:
        raise SystemExit(f"error: no stored runs in {os.path.join(out, 'runs')}")
    config = runs[0]["config"]
    other = [r["name"] for r in runs if r["config"] != config]
    if other:
        raise SystemExit(
            f"error: the runs in {out}/runs were made with different "
            f"configurations ({runs[0]['name']} vs {', '.join(other)}); move "
            "the ones of another configuration elsewhere"
        )
    unknown = sorted(
        {r["method"] for r in runs} - set(METHODS) | {r["schedule"] for r in runs} - set(SCHEDULES)
    )
    if unknown:
        raise SystemExit(
            f"error: {out}/runs holds runs of {', '.join(unknown)}, not of this "
            "grid (benchmarks.efficient writes its own report)"
        )
    found = grid_of(runs)
    found["total"] = len(found["methods"]) * len(found["schedules"]) * len(found["seeds"])
    head = {
        "command": _rerun_command(config, found, out),
        "date": f"{now()} (report rebuilt from the stored runs)",
        "machine": machine_description(),
        "versions": versions(),
        "wall_s": None,
        "grid": found,
    }
    # The header of the invocation that made these runs, where runs.json
    # (older ones have no date, wall time or grid) belongs to them.
    stored = stored_header(out, config)
    if stored is not None:
        head.update({key: stored[key] for key in HEADER_KEYS if key in stored})
        grid = stored.get("grid")
        if (
            isinstance(grid, dict)
            and {r["method"] for r in runs} <= set(grid.get("methods", ()))
            and {r["schedule"] for r in runs} <= set(grid.get("schedules", ()))
            and {r["seed"] for r in runs} <= set(grid.get("seeds", ()))
        ):
            head["grid"] = grid
    args = argparse.Namespace(
        out=out,
        methods=list(head["grid"]["methods"]),
        schedules=list(head["grid"]["schedules"]),
        seeds=list(head["grid"]["seeds"]),
        **{
            key: config[key]
            for key in (
                "dataset",
                "model",
                "epochs",
                "batch",
                "initial_batch",
                "num_samples",
                "sharpness_examples",
                "sharpness_iterations",
            )
        },
    )
    write_report(args, runs, head)
    return len(runs)


def model_folders(out):
    """The model folders `out` names: itself when it holds `runs/`, else its
    subfolders that do; and the grid folder their summary goes to."""
    if os.path.isdir(os.path.join(out, "runs")):
        return [out], os.path.dirname(os.path.normpath(out)) or "."
    if not os.path.isdir(out):
        raise SystemExit(f"error: no folder {out}")
    folders = [
        os.path.join(out, d)
        for d in sorted(os.listdir(out))
        if os.path.isdir(os.path.join(out, d, "runs"))
    ]
    if not folders:
        raise SystemExit(
            f"error: no stored runs in {os.path.join(out, 'runs')} "
            f"or in a model folder of {out} (<model>/runs)"
        )
    return folders, out


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.paper.report",
        description="Rebuild results.md, runs.md, runs.json, the plots and the "
        "verdicts of a paper benchmark folder from its stored runs "
        "(MODEL/runs/*.json), without training; then the grid's summary.md.",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="a grid folder (e.g. benchmarks/results/mnist1d) or one model's folder in it",
    )
    args = parser.parse_args(argv)
    folders, root = model_folders(args.out)
    n = sum(rebuild(folder) for folder in folders)
    write_summary(root, model_folders_with_reports(root))
    print(
        f"report of {n} stored runs written to {', '.join(folders)}; summary in {root}",
        file=sys.stderr,
    )
    return n


if __name__ == "__main__":
    main()
