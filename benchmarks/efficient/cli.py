"""The command line: arguments and the main loop over the grid."""

import argparse
import os

from benchmarks.efficient.methods import AESAM_THRESHOLD
from benchmarks.efficient.methods import ARCHITECTURES
from benchmarks.efficient.methods import COMMAND
from benchmarks.efficient.methods import EPOCHS
from benchmarks.efficient.methods import LOOKSAM_ALPHA
from benchmarks.efficient.methods import METHODS
from benchmarks.efficient.methods import SCHEDULES
from benchmarks.paper import cli as paper_cli
from benchmarks.paper import protocol
from benchmarks.paper import run as paper_run

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
