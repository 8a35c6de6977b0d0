"""The main loop: every run of the grid, stored, then the report."""

import os
import sys
import time

from benchmarks.efficient.cli import for_model
from benchmarks.efficient.cli import parse_args
from benchmarks.efficient.cli import run_config
from benchmarks.efficient.methods import label
from benchmarks.efficient.report import write_report
from benchmarks.efficient.training import train_one
from benchmarks.paper import cli as paper_cli
from benchmarks.paper import data as paper_data
from benchmarks.paper import run as paper_run
from benchmarks.paper import verdicts

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
