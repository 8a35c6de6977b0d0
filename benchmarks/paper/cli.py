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
from benchmarks.paper.protocol import EXTEND_UNTIL_CONVERGED
from benchmarks.paper.protocol import INCREASING
from benchmarks.paper.protocol import INPUT_KIND
from benchmarks.paper.protocol import METHODS
from benchmarks.paper.protocol import MNIST1D_EPOCHS
from benchmarks.paper.protocol import MODEL_INPUT
from benchmarks.paper.protocol import MODELS
from benchmarks.paper.protocol import RESULTS
from benchmarks.paper.protocol import SCHEDULES
from benchmarks.paper.protocol import STAGES
from benchmarks.paper.protocol import STEPS_CONTROL

TINY = {
    "model": "mnist1d_cnn",
    "extend_until_converged": 0.0,
    "jobs": 0,
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


def _models(text):
    return _csv_choice("model", sorted(MODELS))(text)


def _nonnegative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return value


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 10.0:
        raise argparse.ArgumentTypeError(
            f"expected a fraction of the epochs between 0 and 10, got {text!r}"
        )
    return value


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.paper",
        description="Rerun the SGD/SAM/GSAM x batch/lr-schedule comparison of "
        "Harada & Iiduka (2024).",
        epilog="The report of a model's folder can be rebuilt from its stored "
        "runs alone: python -m benchmarks.paper.report --out FOLDER/MODEL",
    )
    p.add_argument("--dataset", default="mnist1d", choices=sorted(DATASETS))
    p.add_argument(
        "--model",
        type=_models,
        default=None,
        help="comma separated; default mnist1d_cnn,mnist1d_mlp for mnist1d, resnet18 for CIFAR",
    )
    p.add_argument(
        "--methods",
        type=_csv_choice("method", METHODS),
        default=None,
        help=f"comma separated, from {','.join(METHODS)}",
    )
    p.add_argument(
        "--schedules",
        type=_csv_choice("schedule", SCHEDULES),
        default=None,
        help=f"comma separated, from {','.join(SCHEDULES)}",
    )
    p.add_argument("--seeds", type=_seeds, default=None, help="default 0,1,2,3,4")
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="total epochs (a multiple of 5 with B/BC/constant_steps); "
        "default: "
        + ", ".join(f"{e} for {m}" for m, e in MNIST1D_EPOCHS.items())
        + ", 200 (the paper's) for CIFAR",
    )
    p.add_argument(
        "--batch", type=_positive_int, default=128, help="constant batch size (default 128)"
    )
    p.add_argument(
        "--initial-batch",
        type=_positive_int,
        default=16,
        help="first batch size of B/BC, doubled 4 times (default 16)",
    )
    p.add_argument(
        "--num-samples",
        type=_positive_int,
        default=None,
        help="mnist1d: examples in total (80%% train), default 4000; "
        "cifar: training examples used (default all)",
    )
    p.add_argument(
        "--data-seed", type=int, default=0, help="seed of the MNIST-1D generation (default 0)"
    )
    p.add_argument(
        "--sharpness-examples",
        type=_positive_int,
        default=None,
        help="first N training examples for the worst-case sharpness (default 1024, as the paper)",
    )
    p.add_argument(
        "--sharpness-iterations",
        type=_positive_int,
        default=None,
        help="Auto-PGD iterations (default 20)",
    )
    p.add_argument(
        "--sharpness-every",
        type=int,
        default=0,
        help="also measure sharpness/gradient norm every k epochs (0: at the end only, default)",
    )
    p.add_argument(
        "--extend-until-converged",
        type=_fraction,
        default=None,
        metavar="FRACTION",
        help="a run whose training loss still moves after its epochs "
        "trains on at its final batch size and rate until it has "
        "stopped, for at most FRACTION x its epochs more (default "
        f"{EXTEND_UNTIL_CONVERGED}; 0: never)",
    )
    p.add_argument(
        "--jobs",
        type=_nonnegative_int,
        default=None,
        help="runs trained side by side, each in its own worker "
        "process; default: one per CPU core without a GPU, 1 with "
        "one; 0: in this process (TensorFlow's threads untouched)",
    )
    p.add_argument(
        "--threads",
        type=_nonnegative_int,
        default=None,
        help="TensorFlow intra-op threads of each worker; default 1 "
        "without a GPU, 0 (TensorFlow's default) with one. Results "
        "depend on it at the rounding level, not on --jobs",
    )
    p.add_argument(
        "--steps-per-execution",
        type=_positive_int,
        default=32,
        help="training steps per call of the compiled step (default "
        "32; the results do not depend on it)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder, one subfolder per model (default benchmarks/results/<dataset>)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny grid for tests: " + ", ".join(f"{k}={v}" for k, v in TINY.items()),
    )
    return p


def _has_gpu():
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


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
                elif key == "model":
                    value = _models(value)
                setattr(args, key, value)
    if args.methods is None:
        args.methods = list(METHODS)
    if args.schedules is None:
        args.schedules = list(SCHEDULES)
    if args.seeds is None:
        args.seeds = [0, 1, 2, 3, 4]
    if args.num_samples is None and args.dataset == "mnist1d":
        args.num_samples = 4000
    if args.sharpness_examples is None:
        args.sharpness_examples = 1024
    if args.sharpness_iterations is None:
        args.sharpness_iterations = 20
    if args.extend_until_converged is None:
        args.extend_until_converged = EXTEND_UNTIL_CONVERGED
    if args.model is None:
        args.model = list(DATASETS[args.dataset][0])
    args.models = args.model
    if args.out is None:
        args.out = os.path.join(RESULTS, args.dataset)
    if args.jobs == 0 and args.threads is not None:
        parser.error(
            "--threads sets the threads of worker processes; with "
            "--jobs 0 (this process) leave it out"
        )
    if args.jobs is None or args.threads is None:
        gpu = args.jobs != 0 and _has_gpu()
        if args.jobs is None:
            args.jobs = 1 if gpu else (os.cpu_count() or 1)
        if args.threads is None:
            args.threads = 0 if gpu or args.jobs == 0 else 1
    if args.sharpness_every < 0:
        parser.error("--sharpness-every must be >= 0")
    uses_stages = [s for s in args.schedules if s in INCREASING + (STEPS_CONTROL,)]
    if uses_stages and args.epochs is not None and args.epochs % STAGES:
        parser.error(
            f"--epochs must be a positive multiple of {STAGES} when the grid has "
            f"{', '.join(uses_stages)}: the batch of B grows over {STAGES} equal "
            f"stages; got --epochs {args.epochs}"
        )
    kind = INPUT_KIND[args.dataset]
    wrong = [m for m in args.models if MODEL_INPUT[m] != kind]
    if wrong:
        fits = [m for m in sorted(MODELS) if MODEL_INPUT[m] == kind]
        parser.error(
            f"--model {','.join(wrong)} does not take the {kind}s of "
            f"--dataset {args.dataset}; for it use: {', '.join(fits)}"
        )
    if args.dataset == "mnist1d" and args.num_samples < 50:
        parser.error("--num-samples must be >= 50 for mnist1d")
    args.parser = parser
    return args


def model_args(args, model):
    """The arguments of one model's grid: `model` and its output folder."""
    values = {k: v for k, v in vars(args).items() if k not in ("parser", "models")}
    epochs = args.epochs
    if epochs is None:
        epochs = DATASETS[args.dataset][2] or MNIST1D_EPOCHS[model]
    values.update(model=model, out=os.path.join(args.out, model), epochs=epochs)
    return argparse.Namespace(**values)


def _progress(text):
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Training one run, in this process or in a worker process.


def _init_worker(threads):
    """Runs first in each worker process, before TensorFlow runs an op."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)


def train_and_store(args, method, schedule, seed, path):
    """Trains one run and stores it at `path`; returns (final, seconds).

    `args` is one model's arguments (`model_args`) as a dict, so that it
    pickles into a worker process."""
    args = argparse.Namespace(**args)
    data = data_lib.cached_data(args.dataset, args.num_samples, args.data_seed)
    t0 = time.perf_counter()
    record = run_lib.train_one(args, data, method, schedule, seed)
    record["run_time_s"] = time.perf_counter() - t0
    run_lib.store_run(path, record)
    return record["final"], record["run_time_s"]


def _executor(args):
    """Worker processes (spawned: TensorFlow is not fork-safe), or None for
    `--jobs 0`."""
    if args.jobs == 0:
        return None
    import concurrent.futures
    import multiprocessing

    return concurrent.futures.ProcessPoolExecutor(
        max_workers=args.jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(args.threads,),
    )


def _run_grid(args, todo, on_done):
    """Trains `todo` = [(model_args dict, method, schedule, seed, path)];
    `on_done(item, final, seconds)` after each, in the order they finish."""
    executor = _executor(args)
    if executor is None:
        for item in todo:
            on_done(item, *train_and_store(*item))
        return
    import concurrent.futures

    try:
        futures = {executor.submit(train_and_store, *item): item for item in todo}
        for future in concurrent.futures.as_completed(futures):
            on_done(futures[future], *future.result())
    finally:
        # On an error or Ctrl-C no new run starts. A run in progress either
        # finishes and is stored whole (its worker did not get the signal) or
        # stops with its worker (Ctrl-C in a terminal reaches them all) and
        # leaves no file: runs are written atomically, never half.
        executor.shutdown(wait=True, cancel_futures=True)


def main(argv=None):
    """Runs the grid; returns `{"trained": n, "skipped": n}`."""
    argv_used = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv_used)
    data_lib.check_memory(args)
    per_model = {m: model_args(args, m) for m in args.models}
    grid = [
        (m, method, schedule, seed)
        for m in args.models
        for seed in args.seeds
        for method in args.methods
        for schedule in args.schedules
    ]
    total = len(grid)
    stats = {"trained": 0, "skipped": 0}
    todo = []
    for i, (model, method, schedule, seed) in enumerate(grid, 1):
        margs = per_model[model]
        os.makedirs(os.path.join(margs.out, "runs"), exist_ok=True)
        path = run_lib.run_path(os.path.join(margs.out, "runs"), method, schedule, seed)
        if run_lib.load_run(path, run_lib.run_config(margs)) is not None:
            stats["skipped"] += 1
            _progress(
                f"[{i}/{total}] {model} {method} {schedule} seed={seed}: done before, skipped"
            )
        else:
            todo.append((vars(margs), method, schedule, seed, path))
    _progress(
        f"{len(todo)} runs to train, {max(args.jobs, 1)} at a time"
        + (f" ({args.threads} thread(s) each)" if args.jobs else "")
    )
    durations = []
    t_start = time.perf_counter()

    trained = {m: 0 for m in args.models}

    def on_done(item, final, seconds):
        margs, method, schedule, seed, _ = item
        durations.append(seconds)
        stats["trained"] += 1
        trained[margs["model"]] += 1
        left = len(todo) - len(durations)
        eta = statistics.fmean(durations) * left / max(args.jobs, 1) / 60
        _progress(
            f"[{stats['trained'] + stats['skipped']}/{total}] {margs['model']} "
            f"{method} {schedule} seed={seed}: test error "
            f"{100 * final['test_error']:.2f}%, sharpness "
            f"{final['worst_case_sharpness']:.3g}, grad norm "
            f"{final['full_gradient_norm']:.3g}, {seconds:.0f} s "
            f"({left} left, ETA {eta:.1f} min)"
        )

    try:
        _run_grid(args, todo, on_done)
    finally:
        # The report covers every finished run of the grid on disk (also the
        # ones after an interruption point) and the other runs stored in the
        # folder with the same configuration; a run in progress never counts.
        wall_s = time.perf_counter() - t_start
        for model, margs in per_model.items():
            finished = []
            for g in grid:
                if g[0] != model:
                    continue
                path = run_lib.run_path(os.path.join(margs.out, "runs"), *g[1:])
                try:
                    record = run_lib.load_run(path, run_lib.run_config(margs))
                except SystemExit:
                    record = None
                if record is not None:
                    finished.append(record)
            if not finished:
                continue
            # With the folder's other runs of this configuration (a grid run
            # that adds schedules or seeds extends the report).
            shown, finished = report.with_stored_runs(margs, finished)
            size = len(shown.methods) * len(shown.schedules) * len(shown.seeds)
            head = report.header(shown, argv_used, size, wall_s, trained[model])
            kept = report.stored_header(margs.out, run_lib.run_config(margs))
            if not trained[model] and kept is not None:
                head.update(kept)  # nothing new: the header of the runs' invocation
            report.write_report(shown, finished, head)
        # Every model folder of the grid folder, also ones of other invocations.
        report.write_summary(args.out, report.model_folders_with_reports(args.out))
    _progress(
        f"trained {stats['trained']}, skipped {stats['skipped']} of {total} "
        f"runs in {time.perf_counter() - t_start:.0f} s; results in {args.out}"
    )
    return stats


if __name__ == "__main__":
    main()
