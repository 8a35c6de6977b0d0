"""Cost of one SAM / GSAM training step relative to a plain Keras step.

The same small conv net with BatchNorm is compiled three times (plain
`keras.Model`, `SAMModel`, `GSAMModel`); their compiled train functions run in
one process, interleaved round by round so that machine noise hits all of them
alike, and the script prints the median time per step and the median of the
per-round ratios. Two gradient evaluations per step make 2.0 the floor for
exact SAM.

    python benchmarks/step_cost.py            # CPU defaults, ~2 minutes
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


def conv_net(image, classes=10, seed=0):
    keras.utils.set_random_seed(seed)
    return small_convnet(image, classes)


def _iterator_of(data, steps):
    import tensorflow as tf

    return iter(tf.data.Dataset.from_tensors(data).repeat())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed call")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--jit", action="store_true", help="jit_compile=True")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    for name in ("batch", "image", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")

    runners = {}
    for name, wrap in (
        ("plain", lambda m: m),
        ("sam", lambda m: keras_sam.SAMModel(m, rho=0.05)),
        ("gsam", lambda m: keras_sam.GSAMModel(m, rho=0.05, alpha=0.02)),
    ):
        model = wrap(conv_net(args.image))
        runners[name] = _timed(model, args)
    for _ in range(args.warmup):
        for run in runners.values():
            run()
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
        "ms_per_step": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "ratio": {
            k: statistics.median(a / b for a, b in zip(times[k], times["plain"]))
            for k in ("sam", "gsam")
        },
    }
    print(f"backend {result['backend']}, keras {result['keras']}, batch {args.batch}, "
          f"{args.image}x{args.image}x3, jit={args.jit}, {result['machine']}")
    for k, ms in result["ms_per_step"].items():
        ratio = "" if k == "plain" else f"   ratio to plain: {result['ratio'][k]:.3f}"
        print(f"{k:>6}: {ms:8.2f} ms/step{ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _timed(model, args):
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=args.steps,
        jit_compile=args.jit,
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.image, args.image, 3)).astype("float32")
    y = rng.integers(0, 10, size=(args.batch,))
    model.make_train_function()
    iterator = _iterator_of((x, y), args.steps)

    def run():
        logs = model.train_function(iterator)
        keras.tree.map_structure(
            lambda t: None if t is None else keras.ops.convert_to_numpy(t), logs
        )

    return run


if __name__ == "__main__":
    main()
