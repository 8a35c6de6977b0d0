"""The plot and the report files of a grid."""

import datetime
import json
import os
import shlex

from benchmarks.efficient.cli import for_model
from benchmarks.efficient.cli import run_config
from benchmarks.efficient.methods import COMMAND
from benchmarks.efficient.methods import LOOKSAM_ALPHA
from benchmarks.efficient.methods import LOOKSAM_ALPHAS
from benchmarks.efficient.methods import MESA_EMA_DECAY
from benchmarks.efficient.methods import MESA_KL_WEIGHT
from benchmarks.efficient.methods import MESA_TEMPERATURE
from benchmarks.efficient.methods import MOMENTUM
from benchmarks.efficient.methods import MSAM_RHO
from benchmarks.efficient.stats import COST
from benchmarks.efficient.stats import KEEP
from benchmarks.efficient.stats import NOT_SETTLED
from benchmarks.efficient.stats import YES
from benchmarks.efficient.stats import guidance
from benchmarks.efficient.stats import summarize
from benchmarks.efficient.stats import table_markdown
from benchmarks.efficient.stats import verdict_markdown
from benchmarks.efficient.stats import verdict_rows
from benchmarks.paper import protocol
from benchmarks.paper import report as paper_report
from benchmarks.paper import run as paper_run
from benchmarks.paper import verdicts

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
