"""Cost of one SAM / GSAM / cheaper-SAM training step relative to a plain Keras step.

The same small conv net with BatchNorm is compiled once per method (plain
`keras.Model`, `SAMModel`, `GSAMModel`, `SAMModel(sam_every=5)`,
`LookSAMModel(sam_every=5)`, `AESAMModel`); their compiled train functions run
in one process, interleaved round by round so that machine noise hits all of
them alike, and the script prints the median time per step and the median of
the per-round ratios. Two gradient evaluations per step make 2.0 the floor for
exact SAM. The cost of `sam_every=5` and LookSAM is periodic (one SAM step in
five), so every timed call runs a whole number of periods (`--steps` must be a
multiple of 5). AE-SAM's cost depends on how many of its steps are SAM steps;
the fraction measured over the timed rounds is reported with it (the batches
cycle through `--batches` random batches, so the gradient norm it switches on
varies from step to step).

    python benchmarks/step_cost.py            # CPU defaults, ~3 minutes
    python benchmarks/step_cost.py --jit      # with XLA
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import keras_sam  # noqa: E402
from benchmarks.architectures import small_convnet  # noqa: E402


SAM_EVERY = 5
"""Steps per SAM step of `sam_every` and LookSAM (the period of their cost)."""

METHODS = {
    # name: (what the README calls it, the wrapper)
    "plain": ("plain", lambda m: m),
    "sam": ("SAM", lambda m: keras_sam.SAMModel(m, rho=0.05)),
    "gsam": ("GSAM", lambda m: keras_sam.GSAMModel(m, rho=0.05, alpha=0.02)),
    "sam_every5": (f"SAM every {SAM_EVERY}",
                   lambda m: keras_sam.SAMModel(m, rho=0.05, sam_every=SAM_EVERY)),
    "looksam5": (f"LookSAM every {SAM_EVERY}",
                 lambda m: keras_sam.LookSAMModel(m, rho=0.05, sam_every=SAM_EVERY,
                                                  alpha=0.7)),
    "aesam": ("AE-SAM", lambda m: keras_sam.AESAMModel(m, rho=0.05, threshold=0.7)),
}


def conv_net(image, classes=10, seed=0):
    keras.utils.set_random_seed(seed)
    return small_convnet(image, classes)


def _iterator_of(data, batch):
    """Endless iterator over the batches of `data` (cycled in order)."""
    import tensorflow as tf

    return iter(tf.data.Dataset.from_tensor_slices(data).batch(batch).repeat())


def _methods(text):
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {bad or '(empty)'}; choose from {', '.join(METHODS)}")
    return ["plain"] + [n for n in dict.fromkeys(names) if n != "plain"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--steps", type=int, default=SAM_EVERY,
                        help=f"steps per timed call, a multiple of {SAM_EVERY}")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, default=8,
                        help="distinct random batches, cycled")
    parser.add_argument("--methods", type=_methods, default=list(METHODS),
                        help="comma separated, from " + ",".join(METHODS)
                        + " (plain is always timed)")
    parser.add_argument("--jit", action="store_true", help="jit_compile=True")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    for name in ("batch", "image", "steps", "rounds", "batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.steps % SAM_EVERY:
        parser.error(f"--steps must be a multiple of {SAM_EVERY}: sam_every={SAM_EVERY} "
                     "and LookSAM cost is periodic, so each timed call runs whole periods")

    runners = {name: _timed(METHODS[name][1](conv_net(args.image)), args)
               for name in args.methods}
    for _ in range(args.warmup):
        for run in runners.values():
            run()
    for run in runners.values():  # sam_fraction counts the timed steps only
        run.model.reset_metrics()
    times = {name: [] for name in runners}
    for r in range(args.rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / args.steps)
        print(f"\rround {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "batch": args.batch,
        "image": args.image,
        "jit": args.jit,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "sam_every": SAM_EVERY,
        "methods": {k: METHODS[k][0] for k in runners},
        "ms_per_step": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "ratio": {
            k: statistics.median(a / b for a, b in zip(times[k], times["plain"]))
            for k in runners if k != "plain"
        },
        # The share of SAM (two-gradient) steps over the timed rounds.
        "sam_fraction": {k: run.sam_fraction() for k, run in runners.items()},
    }
    print(f"backend {result['backend']}, keras {result['keras']}, batch {args.batch}, "
          f"{args.image}x{args.image}x3, jit={args.jit}, {result['machine']}")
    for k, ms in result["ms_per_step"].items():
        ratio = "" if k == "plain" else f"   ratio to plain: {result['ratio'][k]:.3f}"
        fraction = f"   SAM steps: {result['sam_fraction'][k]:.2f}"
        print(f"{METHODS[k][0]:>17}: {ms:8.2f} ms/step{ratio}{fraction}")
    if args.json:
        tmp = f"{args.json}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.json)
    return result


def _timed(model, args):
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=args.steps,
        jit_compile=args.jit,
    )
    rng = np.random.default_rng(0)
    n = args.batch * args.batches
    x = rng.normal(size=(n, args.image, args.image, 3)).astype("float32")
    y = rng.integers(0, 10, size=(n,))
    model.make_train_function()
    iterator = _iterator_of((x, y), args.batch)
    last = {}

    def run():
        logs = model.train_function(iterator)
        last["logs"] = keras.tree.map_structure(
            lambda t: None if t is None else keras.ops.convert_to_numpy(t), logs
        )

    def sam_fraction():
        """Mean of the logged `sam_fraction` since the last reset (SAM and
        GSAM take a SAM step every step, a plain model none)."""
        if "sam_fraction" in last.get("logs", {}):
            return float(last["logs"]["sam_fraction"])
        return 1.0 if isinstance(model, keras_sam.SAMModel) else 0.0

    run.model = model
    run.sam_fraction = sam_fraction
    return run


if __name__ == "__main__":
    main()
