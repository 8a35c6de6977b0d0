"""Command line of the paper benchmark: `python -m benchmarks.paper --help`.

Parses the arguments, checks the grid fits in memory, trains the runs not
stored yet (one progress line each on stderr) and writes the report of every
finished run, also after an interruption.
"""

import argparse
import os
import statistics
import sys
import time

from benchmarks.paper import data as data_lib
from benchmarks.paper import report
from benchmarks.paper import run as run_lib
from benchmarks.paper.protocol import DATASETS
from benchmarks.paper.protocol import INCREASING
from benchmarks.paper.protocol import METHODS
from benchmarks.paper.protocol import MODELS
from benchmarks.paper.protocol import RESULTS
from benchmarks.paper.protocol import SCHEDULES
from benchmarks.paper.protocol import STAGES

TINY = {
    "num_samples": 500,
    "epochs": 5,
    "seeds": "0",
    "methods": "sgd,sam",
    "schedules": "B,BC",
    "sharpness_examples": 128,
    "sharpness_iterations": 5,
}


def _csv_choice(name, allowed):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"unknown {name} {', '.join(map(repr, bad)) or '(empty)'}; "
                f"choose from: {', '.join(allowed)} (comma separated)"
            )
        return list(dict.fromkeys(items))

    return parse


def _seeds(text):
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds must be comma-separated ints, e.g. 0,1,2; got {text!r}"
        ) from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"--seeds must be ints >= 0; got {text!r}")
    return list(dict.fromkeys(seeds))


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.paper",
        description="Rerun the SGD/SAM/GSAM x batch/lr-schedule comparison of "
        "Harada & Iiduka (2024).",
        epilog="The report of a folder can be rebuilt from its stored runs "
        "alone: python -m benchmarks.paper.report --out FOLDER",
    )
    p.add_argument("--dataset", default="mnist1d", choices=sorted(DATASETS))
    p.add_argument("--model", default=None, choices=sorted(MODELS),
                   help="default: mnist1d_cnn for mnist1d, resnet18 for CIFAR")
    p.add_argument("--methods", type=_csv_choice("method", METHODS),
                   default=None, help=f"comma separated, from {','.join(METHODS)}")
    p.add_argument("--schedules", type=_csv_choice("schedule", SCHEDULES),
                   default=None, help=f"comma separated, from {','.join(SCHEDULES)}")
    p.add_argument("--seeds", type=_seeds, default=None, help="default 0,1,2")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="total epochs (a multiple of 5 with B/BC); default 20 "
                   "(the paper: 200)")
    p.add_argument("--batch", type=_positive_int, default=128,
                   help="constant batch size (default 128)")
    p.add_argument("--initial-batch", type=_positive_int, default=16,
                   help="first batch size of B/BC, doubled 4 times (default 16)")
    p.add_argument("--num-samples", type=_positive_int, default=None,
                   help="mnist1d: examples in total (80%% train), default 4000; "
                   "cifar: training examples used (default all)")
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the MNIST-1D generation (default 0)")
    p.add_argument("--sharpness-examples", type=_positive_int, default=None,
                   help="first N training examples for the worst-case "
                   "sharpness (default 1024, as the paper)")
    p.add_argument("--sharpness-iterations", type=_positive_int, default=None,
                   help="Auto-PGD iterations (default 20)")
    p.add_argument("--sharpness-every", type=int, default=0,
                   help="also measure sharpness/gradient norm every k epochs "
                   "(0: at the end only, default)")
    p.add_argument("--out", default=None,
                   help="output folder (default benchmarks/results/<dataset>)")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny grid for tests: " + ", ".join(
                       f"{k}={v}" for k, v in TINY.items()))
    return p


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            if getattr(args, key) is None:
                if key == "seeds":
                    value = _seeds(value)
                elif key == "methods":
                    value = _csv_choice("method", METHODS)(value)
                elif key == "schedules":
                    value = _csv_choice("schedule", SCHEDULES)(value)
                setattr(args, key, value)
    if args.methods is None:
        args.methods = list(METHODS)
    if args.schedules is None:
        args.schedules = list(SCHEDULES)
    if args.seeds is None:
        args.seeds = [0, 1, 2]
    if args.epochs is None:
        args.epochs = 20
    if args.num_samples is None and args.dataset == "mnist1d":
        args.num_samples = 4000
    if args.sharpness_examples is None:
        args.sharpness_examples = 1024
    if args.sharpness_iterations is None:
        args.sharpness_iterations = 20
    if args.model is None:
        args.model = DATASETS[args.dataset][0]
    if args.out is None:
        args.out = os.path.join(RESULTS, args.dataset)
    if args.sharpness_every < 0:
        parser.error("--sharpness-every must be >= 0")
    if any(s in INCREASING for s in args.schedules) and args.epochs % STAGES:
        parser.error(
            f"--epochs must be a positive multiple of {STAGES} when the grid has "
            f"an increasing-batch schedule ({', '.join(INCREASING)}): the batch "
            f"grows over {STAGES} equal stages; got --epochs {args.epochs}"
        )
    if args.dataset == "mnist1d" and args.model not in ("mnist1d_cnn",):
        parser.error(
            f"--model {args.model} does not take MNIST-1D's (40, 1) signals; "
            "for --dataset mnist1d use: mnist1d_cnn"
        )
    if args.dataset != "mnist1d" and args.model == "mnist1d_cnn":
        parser.error(
            f"--model mnist1d_cnn takes 1-D signals; for --dataset {args.dataset} "
            f"use one of: {', '.join(m for m in sorted(MODELS) if m != 'mnist1d_cnn')}"
        )
    if args.dataset == "mnist1d" and args.num_samples < 50:
        parser.error("--num-samples must be >= 50 for mnist1d")
    args.parser = parser
    return args


def _progress(text):
    print(text, file=sys.stderr, flush=True)


def main(argv=None):
    """Runs the grid; returns `{"trained": n, "skipped": n}`."""
    argv_used = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv_used)
    data_lib.check_memory(args)
    runs_dir = os.path.join(args.out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    config = run_lib.run_config(args)
    grid = [(m, s, k) for k in args.seeds for m in args.methods for s in args.schedules]
    total = len(grid)
    data = None
    durations = []
    stats = {"trained": 0, "skipped": 0}
    t_start = time.perf_counter()
    try:
        for i, (method, schedule, seed) in enumerate(grid, 1):
            path = run_lib.run_path(runs_dir, method, schedule, seed)
            record = run_lib.load_run(path, config)
            if record is not None:
                stats["skipped"] += 1
                _progress(f"[{i}/{total}] {method} {schedule} seed={seed}: "
                          "done before, skipped")
                continue
            remaining = sum(1 for g in grid[i - 1:]
                            if not os.path.exists(run_lib.run_path(runs_dir, *g)))
            eta = (f"ETA {statistics.fmean(durations) * remaining / 60:.1f} min"
                   if durations else "ETA after the first run")
            _progress(f"[{i}/{total}] {method} {schedule} seed={seed}: training "
                      f"({remaining} left incl. this one, {eta})")
            if data is None:
                data = data_lib.Data(args.dataset, args.num_samples, args.data_seed)
            t0 = time.perf_counter()
            record = run_lib.train_one(args, data, method, schedule, seed)
            durations.append(time.perf_counter() - t0)
            record["run_time_s"] = durations[-1]
            run_lib.store_run(path, record)
            stats["trained"] += 1
            f = record["final"]
            _progress(f"[{i}/{total}] {method} {schedule} seed={seed}: "
                      f"test error {100 * f['test_error']:.2f}%, sharpness "
                      f"{f['worst_case_sharpness']:.3g}, grad norm "
                      f"{f['full_gradient_norm']:.3g}, {durations[-1]:.0f} s")
    finally:
        # The report covers every finished run of the grid on disk (also the
        # ones after an interruption point); a run in progress never counts.
        finished = []
        for g in grid:
            try:
                record = run_lib.load_run(run_lib.run_path(runs_dir, *g), config)
            except SystemExit:
                record = None
            if record is not None:
                finished.append(record)
        if finished:
            report.write_report(args, finished, report.header(
                args, argv_used, total, time.perf_counter() - t_start))
    _progress(f"trained {stats['trained']}, skipped {stats['skipped']} of {total} "
              f"runs in {time.perf_counter() - t_start:.0f} s; results in {args.out}")
    return stats


if __name__ == "__main__":
    main()
