"""Cost of a batch-size switch by `BatchSizeScheduler` inside one `fit()`.

Two runs of a small conv net with BatchNorm trained as a `keras_sam.SAMModel`:

- switch: ONE fit of two epochs, batch B1 in epoch 0 and B2 in epoch 1
  (`BatchSizeScheduler({0: B1, 1: B2}, dataset_fn)`);
- fresh: a new model, one fit of one epoch at batch B2;
- phases: the public-API alternative to the scheduler, one fit per batch
  size on the same model (`fit(B1 data, epochs=1)`, then
  `fit(B2 data, initial_epoch=1, epochs=2)`).

A callback times every step (`on_train_batch_begin` -> `on_train_batch_end`,
`time.perf_counter`, the loss read back to synchronize). Measured at B2:

(a) steady-state throughput, examples/s from the median step time over the
    steps after `--warmup`; target: switch within 5% of fresh;
(b) cost of the switch: first step after the switch minus the steady step,
    in steady steps (target: <= 1 extra step), next to the same figure
    for the first step of the fresh fit (which includes tracing).

The two runs alternate, `--reps` times each, in one process; figures are
medians over repetitions. Progress goes to stderr.

    python benchmarks/batch_switch.py            # CPU defaults, ~2-3 minutes
    python benchmarks/batch_switch.py --jit      # with XLA
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import benchmarks  # noqa: E402

benchmarks.import_tensorflow_quietly()  # before Keras: no C++ start-up lines

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_sam  # noqa: E402
from benchmarks.architectures import small_convnet  # noqa: E402
from keras_sam.callbacks import BatchSizeScheduler  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def conv_net(image, classes=10, seed=0):
    keras.utils.set_random_seed(seed)
    return small_convnet(image, classes)


class StepTimer(keras.callbacks.Callback):
    """Per-step wall times (seconds) and train-step traces, per epoch."""

    def __init__(self, trace_counter):
        super().__init__()
        self.trace_counter = trace_counter  # [number of train_step traces]
        self.times = {}  # epoch -> [seconds per step]
        self.traces = {}  # epoch -> traces during the epoch
        self._epoch = None
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self.times[epoch] = []
        self._traces_before = self.trace_counter[0]

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if logs and "loss" in logs:
            np.asarray(logs["loss"])  # wait for the step's result
        self.times[self._epoch].append(time.perf_counter() - self._start)

    def on_epoch_end(self, epoch, logs=None):
        self.traces[epoch] = self.trace_counter[0] - self._traces_before


def run(kind, args, x, y):
    """One fit; returns (first step s, steady median step s, traces at B2)."""
    keras.backend.clear_session()

    def dataset_fn(batch_size):
        return (
            tf.data.Dataset.from_tensor_slices((x, y))
            .batch(batch_size, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE)
        )

    model = keras_sam.SAMModel(conv_net(args.image), rho=0.05)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=args.jit,
    )
    # Count traces: the train function calls `train_step` once per trace.
    counter = [0]
    train_step = model.train_step

    def counting_train_step(data):
        counter[0] += 1
        return train_step(data)

    model.train_step = counting_train_step
    timer = StepTimer(counter)
    if kind == "switch":
        scheduler = BatchSizeScheduler({0: args.b1, 1: args.b2}, dataset_fn)
        model.fit(
            dataset_fn(args.b1), epochs=2, callbacks=[scheduler, timer], verbose=0, shuffle=False
        )
        times, traces = timer.times[1], timer.traces[1]
    elif kind == "phases":
        model.fit(dataset_fn(args.b1), epochs=1, callbacks=[timer], verbose=0, shuffle=False)
        model.fit(
            dataset_fn(args.b2),
            initial_epoch=1,
            epochs=2,
            callbacks=[timer],
            verbose=0,
            shuffle=False,
        )
        times, traces = timer.times[1], timer.traces[1]
    else:
        model.fit(dataset_fn(args.b2), epochs=1, callbacks=[timer], verbose=0, shuffle=False)
        times, traces = timer.times[0], timer.traces[0]
    if len(times) != args.steps:
        raise RuntimeError(f"{kind}: {len(times)} steps at B2, expected {args.steps}")
    steady = times[args.warmup :]
    return times[0], statistics.median(steady), min(steady), traces


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--b1", type=int, default=32, help="batch size before")
    parser.add_argument("--b2", type=int, default=128, help="batch size after")
    parser.add_argument("--steps", type=int, default=40, help="steps at B2")
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--image", type=int, default=16)
    parser.add_argument("--jit", action="store_true", help="jit_compile=True")
    parser.add_argument(
        "--out", default=RESULTS, help="folder for batch_switch.md/.json ('' = none)"
    )
    args = parser.parse_args(argv)
    if min(args.b1, args.b2, args.steps, args.reps, args.image) < 1:
        parser.error("sizes must be positive")
    if not 0 <= args.warmup < args.steps - 1:
        parser.error("--warmup must be in [0, steps - 1)")

    rng = np.random.default_rng(0)
    n = args.steps * args.b2
    x = rng.normal(size=(n, args.image, args.image, 3)).astype("float32")
    y = rng.integers(0, 10, size=n).astype("int32")

    runs = {"switch": [], "fresh": [], "phases": []}
    for rep in range(args.reps):
        order = ("switch", "fresh", "phases")
        order = order if rep % 2 == 0 else order[::-1]
        for kind in order:
            first, steady, fastest, traces = run(kind, args, x, y)
            runs[kind].append(
                {"first_s": first, "steady_s": steady, "min_s": fastest, "traces": traces}
            )
            log(
                f"rep {rep + 1}/{args.reps} {kind:>6}: first {first * 1e3:8.1f} ms, "
                f"steady {steady * 1e3:7.2f} ms/step, {traces} trace(s) at B2"
            )

    def summary(kind):
        reps = runs[kind]
        steady = statistics.median(r["steady_s"] for r in reps)
        extra = statistics.median((r["first_s"] - r["steady_s"]) / r["steady_s"] for r in reps)
        return {
            "steady_ms": steady * 1e3,
            "throughput": args.b2 / steady,
            "first_ms": statistics.median(r["first_s"] for r in reps) * 1e3,
            "first_extra_steps": extra,
            "traces_at_b2": statistics.median(r["traces"] for r in reps),
            "reps": reps,
        }

    result = {
        "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {platform.system()}",
        "python": platform.python_version(),
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "backend": keras.backend.backend(),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "switch": summary("switch"),
        "fresh": summary("fresh"),
        "phases": summary("phases"),
    }
    # throughput switch / fresh = steady step fresh / steady step switch
    ratios = [f["steady_s"] / s["steady_s"] for s, f in zip(runs["switch"], runs["fresh"])]
    result["throughput_ratio"] = statistics.median(ratios)
    # the same from the fastest steady step (less sensitive to other load)
    result["throughput_ratio_min_step"] = statistics.median(
        f["min_s"] / s["min_s"] for s, f in zip(runs["switch"], runs["fresh"])
    )
    result["load_average_after"] = os.getloadavg()
    ratio_ok = abs(result["throughput_ratio"] - 1) <= 0.05
    switch_ok = result["switch"]["first_extra_steps"] <= 1
    result["requirements"] = {
        "throughput_within_5pct": ratio_ok,
        "switch_cost_le_1_step": switch_ok,
    }

    rows = [
        "| run | steady ms/step | examples/s | first step ms "
        "| first step extra (steady steps) | train-step traces at B2 |",
        "|---|---|---|---|---|---|",
    ]
    for kind, label in (
        ("switch", f"switch {args.b1}->{args.b2}"),
        ("fresh", f"fresh fit at {args.b2}"),
        ("phases", f"one fit per batch size ({args.b1}, then {args.b2})"),
    ):
        s = result[kind]
        rows.append(
            f"| {label} | {s['steady_ms']:.2f} | {s['throughput']:.0f} | "
            f"{s['first_ms']:.1f} | {s['first_extra_steps']:.2f} | "
            f"{s['traces_at_b2']:g} |"
        )
    lines = rows + [
        "",
        f"throughput ratio switch/fresh: {result['throughput_ratio']:.3f} "
        f"(per rep {', '.join(f'{r:.3f}' for r in ratios)}; "
        f"{'within' if ratio_ok else 'outside'} 0.95-1.05); from the fastest steady step: "
        f"{result['throughput_ratio_min_step']:.3f}",
        f"switch cost: {result['switch']['first_extra_steps']:.2f} extra steps "
        f"({'at most' if switch_ok else 'more than'} 1); first step of a "
        f"fresh fit (with tracing): {result['fresh']['first_extra_steps']:.2f} extra steps",
        f"public-API alternative (a second fit at {args.b2} on the same model): first "
        f"step {result['phases']['first_extra_steps']:.2f} extra steps, "
        f"{result['phases']['traces_at_b2']:g} train-step trace(s)",
    ]
    header = (
        f"SAMModel conv net {args.image}x{args.image}x3, B1={args.b1}, "
        f"B2={args.b2}, {args.steps} steps at B2, warmup {args.warmup}, "
        f"{args.reps} reps, jit={args.jit}; {result['machine']}, "
        f"keras {keras.__version__}, tensorflow {tf.__version__}, "
        "load average after run " + "/".join(f"{v:.1f}" for v in result["load_average_after"])
    )
    print(header)
    print("\n".join(lines))

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "batch_switch.json"), "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.join(args.out, "batch_switch.md"), "w") as f:
            f.write("# Batch-size switch cost (`benchmarks/batch_switch.py`)\n\n")
            f.write(f"`{result['command']}`\n\n{header}\n\n")
            f.write(
                "Medians over repetitions; a step is timed from "
                "`on_train_batch_begin` to `on_train_batch_end`.\n\n"
            )
            f.write("\n".join(lines) + "\n")
        log(f"wrote {args.out}/batch_switch.md and .json")
    return result


if __name__ == "__main__":
    main()
