"""Compare two runs of the same grid: wall time and results, e.g. before and
after a speed-up, or with another `--jobs` / `--threads`:

    python -m benchmarks.paper.compare BEFORE AFTER --out FILE.md

BEFORE and AFTER are model folders (with `runs.json`, as `benchmarks.paper`
writes them). The report gives each folder's command, machine and wall time,
the speed-up, and for every grid cell the mean test error and sharpness of
both beside the seed-to-seed spread, so "the same numbers" can be read off:
equal when the runs are bitwise equal, else how far apart.
"""

import argparse
import math
import os
import statistics
import sys

from benchmarks.paper import run as run_lib


def _load(folder):
    stored = run_lib.read_run(os.path.join(folder, "runs.json"))
    if not isinstance(stored, dict) or "runs" not in stored:
        raise SystemExit(f"error: {folder} has no runs.json of a paper grid")
    return stored


def _records(folder, stored):
    """The grid's whole run records: `runs/<name>.json` beside `runs.json`
    (whose entries have no per-epoch records), else the entries themselves
    (reports written before they were split)."""
    records = []
    for entry in stored["runs"]:
        path = run_lib.named_run_path(os.path.join(folder, "runs"), entry["name"])
        record = run_lib.read_run(path)
        if record is None and "epochs" in entry:
            record = entry
        if record is None:
            raise SystemExit(f"error: {folder}/runs/{entry['name']}.json is missing")
        records.append(record)
    return records


def _cells(runs):
    cells = {}
    for r in runs:
        cells.setdefault((r["method"], r["schedule"]), {})[r["seed"]] = r
    return cells


RESULT_KEYS = ("test_error", "train_loss", "worst_case_sharpness", "full_gradient_norm")
EPOCH_KEYS = ("train_loss", "test_loss", "test_error", "learning_rate", "iterations")


def same_results(x, y):
    """Two run records with equal results: the final measures and every
    epoch's losses, errors, rate and step count (times are left out)."""
    return (
        all(x["final"][k] == y["final"][k] for k in RESULT_KEYS)
        and len(x["epochs"]) == len(y["epochs"])
        and all(ex[k] == ey[k] for ex, ey in zip(x["epochs"], y["epochs"]) for k in EPOCH_KEYS)
    )


def _check_timed(stored, folder):
    if stored.get("wall_s") is None:
        raise SystemExit(
            f"error: {folder}/runs.json records no wall time (a report "
            "rebuilt without the header of the invocation that trained it)"
        )
    trained = stored.get("trained")
    if trained is not None and trained != len(stored["runs"]):
        raise SystemExit(
            f"error: the wall time in {folder} covers {trained} of its "
            f"{len(stored['runs'])} runs (the others were stored before); compare "
            "grids trained whole by one invocation"
        )


def _without_out(command):
    """The command line without its `--out FOLDER` (where the folder was
    then, not where the comparison reads it now)."""
    words = command.split(" ")
    if "--out" in words:
        i = words.index("--out")
        words = words[:i] + words[i + 2 :]
    return " ".join(words)


def compare(before, after):
    """Markdown comparing the grids in folders `before` and `after`."""
    a, b = _load(before), _load(after)
    if a["config"] != b["config"]:
        diff = {
            k: (a["config"].get(k), v) for k, v in b["config"].items() if a["config"].get(k) != v
        }
        raise SystemExit(f"error: the grids differ in their configuration: {diff}")
    _check_timed(a, before)
    _check_timed(b, after)
    ca, cb = _cells(_records(before, a)), _cells(_records(after, b))
    keys = [k for k in ca if k in cb]
    lines = [
        "| | command (`--out` left out) | date | machine | runs | wall time s |",
        "|---|---|---|---|---|---|",
        f"| before | `{_without_out(a['command'])}` | {a['date']} | {a['machine']} | "
        f"{len(a['runs'])} | {a['wall_s']:.0f} |",
        f"| after | `{_without_out(b['command'])}` | {b['date']} | {b['machine']} | "
        f"{len(b['runs'])} | {b['wall_s']:.0f} |",
        "",
        f"Speed-up of the whole grid (wall time before / after): "
        f"**{a['wall_s'] / b['wall_s']:.2f}x**.",
        "",
        "| method | schedule | seeds | test error % before | after | seed std | "
        "sharpness before | after | seed std | bitwise equal runs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    equal_runs = total_runs = 0
    for method, schedule in keys:
        seeds = sorted(set(ca[(method, schedule)]) & set(cb[(method, schedule)]))
        runs_a = [ca[(method, schedule)][s] for s in seeds]
        runs_b = [cb[(method, schedule)][s] for s in seeds]
        same = sum(same_results(x, y) for x, y in zip(runs_a, runs_b))
        ra, rb = [r["final"] for r in runs_a], [r["final"] for r in runs_b]

        def mean(rs, key):
            return statistics.fmean(r[key] for r in rs)

        def spread(rs, key):
            return statistics.stdev(r[key] for r in rs) if len(rs) > 1 else math.nan

        equal_runs += same
        total_runs += len(seeds)
        lines.append(
            f"| {method} | {schedule} | {len(seeds)} | "
            f"{100 * mean(ra, 'test_error'):.2f} | {100 * mean(rb, 'test_error'):.2f} | "
            f"{100 * spread(ra, 'test_error'):.2f} | "
            f"{mean(ra, 'worst_case_sharpness'):.3g} | {mean(rb, 'worst_case_sharpness'):.3g} | "
            f"{spread(ra, 'worst_case_sharpness'):.2g} | {same}/{len(seeds)} |"
        )
    threads = [sorted({r.get("intra_op_threads") for r in s["runs"]} - {None}) for s in (a, b)]
    lines += [
        "",
        f"Runs bitwise equal (final measures and every epoch's losses, "
        f"errors, rate and steps): {equal_runs} of {total_runs}. TensorFlow "
        f"intra-op threads per run: before {threads[0] or 'not recorded (default)'}, "
        f"after {threads[1] or 'not recorded (default)'}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.paper.compare",
        description="Compare the wall time and results of two runs of one grid.",
    )
    parser.add_argument("before", help="model folder of the first run (has runs.json)")
    parser.add_argument("after", help="model folder of the second run")
    parser.add_argument("--out", default=None, help="write the markdown here (default: print it)")
    args = parser.parse_args(argv)
    text = compare(args.before, args.after)
    if args.out:
        run_lib.write_atomic(args.out, text)
        print(f"comparison written to {args.out}", file=sys.stderr)
    else:
        print(text)
    return text


if __name__ == "__main__":
    main()
