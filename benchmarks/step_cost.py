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
    python benchmarks/step_cost.py --fit-calls   # whole fit calls, 5 fresh processes
    python benchmarks/step_cost.py --noise-scale # the noise scale estimate on vs off
    python benchmarks/step_cost.py --epochs --methods sam,sam_every5,looksam5  # whole epochs

`--noise-scale` times plain (`SAMModel(rho=0)`), SAM and GSAM with and without
`noise_scale=True` and reports, beside the ratios to plain, the median
per-round ratio of each method with the estimate to the same method without
it (the cost of the estimate: on one device the clean gradient as two halves
of the batch, the norms and the moving averages).

`--fit-calls` measures the cost as a user who times epochs sees it: in each
of `--processes` fresh processes, every method's model makes `--calls`
timed `fit` calls of `--fit-steps` steps (after one untimed call that
traces), interleaved; each call's ratio is its time over the plain model's
call of the same round. It reports the median ratio, the per-process medians
and the range over single calls, and how many calls of each model (plain
Keras included) spent more than 0.1 s in `fit`'s teardown, after the last
callback: that is where the slow calls are. TensorFlow's tf.data autotuning
runs a background thread per iterator, and ending the epoch's iterator waits
for it; a call that ends just after it woke waits up to the next wake-up
(about 0.4-0.6 s here, so call times snap to ~1.3 s or ~2.6 s on this
machine). It hits plain Keras models alike and disappears with autotuning off
(`--no-autotune`: `tf.data.Options().autotune.enabled = False` on the
dataset), which is the workaround for anyone timing short `fit` calls.
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

import keras_sam  # noqa: E402
from benchmarks._results import write_json  # noqa: E402
from benchmarks.architectures import small_convnet  # noqa: E402

SAM_EVERY = 5
"""Steps per SAM step of `sam_every` and LookSAM (the period of their cost)."""

METHODS = {
    # name: (what the README calls it, the wrapper)
    "plain": ("plain", lambda m: m),
    "sam": ("SAM", lambda m: keras_sam.SAMModel(m, rho=0.05)),
    "gsam": ("GSAM", lambda m: keras_sam.GSAMModel(m, rho=0.05, alpha=0.02)),
    "sam_every5": (
        f"SAM every {SAM_EVERY}",
        lambda m: keras_sam.SAMModel(m, rho=0.05, sam_every=SAM_EVERY),
    ),
    "looksam5": (
        f"LookSAM every {SAM_EVERY}",
        lambda m: keras_sam.LookSAMModel(m, rho=0.05, sam_every=SAM_EVERY, alpha=0.7),
    ),
    "aesam": ("AE-SAM", lambda m: keras_sam.AESAMModel(m, rho=0.05, threshold=0.7)),
    "msam": ("Momentum-SAM", lambda m: keras_sam.MSAMModel(m, rho=0.3)),
    # kl_start_epoch=-1: the teacher's pass runs from the first step.
    "mesa": (
        "MESA",
        lambda m: keras_sam.MESAModel(m, kl_weight=0.8, kl_start_epoch=-1, ema_decay=0.99),
    ),
}
DEFAULT_METHODS = list(METHODS)

NOISE_SCALE_PAIRS = {
    # with the estimate: the same method without it (`--noise-scale`)
    "plain_noise": "plain_rho0",
    "sam_noise": "sam",
    "gsam_noise": "gsam",
}
METHODS.update(
    plain_rho0=("plain (SAMModel, rho 0)", lambda m: keras_sam.SAMModel(m, rho=0.0)),
    plain_noise=(
        "plain + noise scale",
        lambda m: keras_sam.SAMModel(m, rho=0.0, noise_scale=True),
    ),
    sam_noise=("SAM + noise scale", lambda m: keras_sam.SAMModel(m, rho=0.05, noise_scale=True)),
    gsam_noise=(
        "GSAM + noise scale",
        lambda m: keras_sam.GSAMModel(m, rho=0.05, alpha=0.02, noise_scale=True),
    ),
)


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
            f"unknown method(s) {bad or '(empty)'}; choose from {', '.join(METHODS)}"
        )
    return ["plain"] + [n for n in dict.fromkeys(names) if n != "plain"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument(
        "--steps",
        type=int,
        default=SAM_EVERY,
        help=f"steps per timed call, a multiple of {SAM_EVERY}",
    )
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, default=8, help="distinct random batches, cycled")
    parser.add_argument(
        "--methods",
        type=_methods,
        default=DEFAULT_METHODS,
        help="comma separated, from " + ",".join(METHODS) + " (plain is always timed)",
    )
    parser.add_argument("--jit", action="store_true", help="jit_compile=True")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--fit-calls", action="store_true", help="time whole `fit` calls in fresh processes instead"
    )
    parser.add_argument(
        "--processes", type=int, default=5, help="fresh processes of --fit-calls (default 5)"
    )
    parser.add_argument(
        "--calls", type=int, default=7, help="timed fit calls per method and process (default 7)"
    )
    parser.add_argument(
        "--fit-steps", type=int, default=20, help="steps per fit call, a multiple of 5 (default 20)"
    )
    parser.add_argument(
        "--no-autotune",
        action="store_true",
        help="with --fit-calls: a tf.data pipeline with autotuning off instead of NumPy arrays",
    )
    parser.add_argument(
        "--noise-scale",
        action="store_true",
        help="time SAM, GSAM and plain with the noise scale estimate on and off",
    )
    parser.add_argument(
        "--epochs",
        action="store_true",
        help="time whole epochs of fit in this process (one step per call: the steps "
        "that sam_every and LookSAM choose on the host); --rounds epochs per method",
    )
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.noise_scale:
        args.methods = ["plain"] + [m for pair in NOISE_SCALE_PAIRS.items() for m in pair[::-1]]
    for name in ("processes", "calls", "fit_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.fit_steps % SAM_EVERY:
        parser.error(f"--fit-steps must be a multiple of {SAM_EVERY}")
    if args.child_out:
        return _fit_calls_in_this_process(args)
    if args.fit_calls:
        return fit_calls(args)
    if args.epochs:
        return epochs_in_process(args)
    for name in ("batch", "image", "steps", "rounds", "batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.steps % SAM_EVERY:
        parser.error(
            f"--steps must be a multiple of {SAM_EVERY}: sam_every={SAM_EVERY} "
            "and LookSAM cost is periodic, so each timed call runs whole periods"
        )

    runners = {name: _timed(METHODS[name][1](conv_net(args.image)), args) for name in args.methods}
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
        **_setting(args),
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "sam_every": SAM_EVERY,
        "methods": {k: METHODS[k][0] for k in runners},
        "ms_per_step": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "ratio": {
            k: statistics.median(a / b for a, b in zip(times[k], times["plain"]))
            for k in runners
            if k != "plain"
        },
        # The share of SAM (two-gradient) steps over the timed rounds.
        "sam_fraction": {k: run.sam_fraction() for k, run in runners.items()},
        # With the noise scale estimate against the same method without it.
        "estimate_ratio": {
            k: statistics.median(a / b for a, b in zip(times[k], times[base]))
            for k, base in NOISE_SCALE_PAIRS.items()
            if k in runners and base in runners
        },
    }
    print(
        f"backend {result['backend']}, keras {result['keras']}, batch {args.batch}, "
        f"{args.image}x{args.image}x3, jit={args.jit}, {result['machine']}"
    )
    for k, ms in result["ms_per_step"].items():
        ratio = "" if k == "plain" else f"   ratio to plain: {result['ratio'][k]:.3f}"
        fraction = f"   SAM steps: {result['sam_fraction'][k]:.2f}"
        print(f"{METHODS[k][0]:>22}: {ms:8.2f} ms/step{ratio}{fraction}")
    for k, r in result["estimate_ratio"].items():
        print(f"{METHODS[k][0]:>22}: {r:.3f}x {METHODS[NOISE_SCALE_PAIRS[k]][0]}")
    if args.json:
        write_json(args.json, result)
    return result


# ---------------------------------------------------------------------------
# Whole fit calls, as a user who times epochs sees the cost.


def _fit_calls_in_this_process(args):
    """One process: every method's model, one untimed fit call (tracing),
    then `--calls` rounds of one timed `fit` call per method, interleaved.
    Writes `{method: [seconds per call]}` to `--child-out`."""
    rng = np.random.default_rng(0)
    n = args.batch * args.fit_steps
    x = rng.normal(size=(n, args.image, args.image, 3)).astype("float32")
    y = rng.integers(0, 10, size=(n,))
    models = {
        name: _compile(METHODS[name][1](conv_net(args.image)), jit_compile=args.jit)
        for name in args.methods
    }
    if args.no_autotune:
        import tensorflow as tf

        options = tf.data.Options()
        options.autotune.enabled = False
        data = dict(
            x=tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch).with_options(options),
            shuffle=False,
        )
    else:  # NumPy arrays, as most users pass them
        data = dict(x=x, y=y, batch_size=args.batch, shuffle=False)
    end = _TrainEnd()

    def one_call(model):
        start = time.perf_counter()
        model.fit(epochs=1, verbose=0, callbacks=[end], **data)
        done = time.perf_counter()
        return done - start, done - end.time

    for model in models.values():
        one_call(model)
    times = {name: [] for name in models}
    tails = {name: [] for name in models}
    for _ in range(args.calls):
        for name, model in models.items():
            call, tail = one_call(model)
            times[name].append(call)
            tails[name].append(tail)
    with open(args.child_out, "w") as f:
        json.dump({"times": times, "tails": tails}, f)
    return times


# ---------------------------------------------------------------------------
# Whole epochs in one process: the steps each method's fit chooses.


class _EpochTime(keras.callbacks.Callback):
    """Seconds from an epoch's first to its last callback (no fit teardown)."""

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self.start


def epochs_in_process(args):
    """`--epochs`: every method's model trains one epoch of `--fit-steps`
    steps per round, the methods interleaved, `--rounds` rounds after one
    untimed epoch each (tracing). One step per call, as `fit` runs by
    default, so `sam_every` and LookSAM run the kind of step chosen on the
    host; the epochs continue the step count, so each holds `--fit-steps /
    5` SAM steps of theirs. tf.data autotuning is off (see `--fit-calls`).
    Reports the median of the per-round ratios to plain, the ratio of the
    fastest epochs, and what one SAM step in five would cost at SAM's
    measured ratio, `1 + (SAM - 1) / 5`."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    n = args.batch * args.fit_steps
    x = rng.normal(size=(n, args.image, args.image, 3)).astype("float32")
    y = rng.integers(0, 10, size=(n,))
    options = tf.data.Options()
    options.autotune.enabled = False
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch).with_options(options)
    models = {
        name: _compile(METHODS[name][1](conv_net(args.image)), jit_compile=args.jit)
        for name in args.methods
    }
    clock = _EpochTime()
    for model in models.values():
        model.fit(data, epochs=1, verbose=0)
    times = {name: [] for name in models}
    for r in range(args.rounds):
        for name, model in models.items():
            model.fit(data, epochs=1, verbose=0, callbacks=[clock])
            times[name].append(clock.seconds / args.fit_steps)
        print(f"\rround {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    plain = times["plain"]
    result = {
        **_setting(args),
        "mode": "epochs",
        "fit_steps": args.fit_steps,
        "rounds": args.rounds,
        "sam_every": SAM_EVERY,
        "methods": {k: METHODS[k][0] for k in models},
        "ms_per_step": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "ratio": {
            k: statistics.median(a / b for a, b in zip(v, plain))
            for k, v in times.items()
            if k != "plain"
        },
        "ratio_fastest": {k: min(v) / min(plain) for k, v in times.items() if k != "plain"},
    }
    if "sam" in result["ratio"]:
        result["one_in_five"] = 1 + (result["ratio"]["sam"] - 1) / SAM_EVERY
    print(
        f"backend {result['backend']}, keras {result['keras']}, batch {args.batch}, "
        f"{args.image}x{args.image}x3, jit={args.jit}, {result['machine']}, "
        f"{args.rounds} epochs of {args.fit_steps} steps per method"
    )
    for k, ms in result["ms_per_step"].items():
        ratio = (
            ""
            if k == "plain"
            else (
                f"   ratio to plain: {result['ratio'][k]:.3f} (fastest epochs "
                f"{result['ratio_fastest'][k]:.3f})"
            )
        )
        print(f"{METHODS[k][0]:>22}: {ms:8.2f} ms/step{ratio}")
    if "one_in_five" in result:
        print(f"1 + (SAM - 1) / {SAM_EVERY} = {result['one_in_five']:.3f}")
    if args.json:
        write_json(args.json, result)
    return result


class _TrainEnd(keras.callbacks.Callback):
    """When `fit` ran its last callback (what follows is fit's teardown)."""

    def on_train_end(self, logs=None):
        self.time = time.perf_counter()


SLOW_TEARDOWN_S = 0.1
"""A fit call whose teardown (after `on_train_end`) takes longer waited on
tf.data's autotuning thread (see the module docstring)."""


def _call(process, name, i, without_teardown):
    call = process["times"][name][i]
    return call - process["tails"][name][i] if without_teardown else call


def fit_calls(args):
    """`--processes` fresh processes of `_fit_calls_in_this_process`; the
    ratio of a call is its time over the plain call of the same round."""
    import subprocess
    import tempfile

    per_process = []
    with tempfile.TemporaryDirectory() as folder:
        for p in range(args.processes):
            out = os.path.join(folder, f"process{p}.json")
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--child-out",
                out,
                "--methods",
                ",".join(args.methods),
                "--batch",
                str(args.batch),
                "--image",
                str(args.image),
                "--calls",
                str(args.calls),
                "--fit-steps",
                str(args.fit_steps),
            ]
            cmd += ["--jit"] if args.jit else []
            cmd += ["--no-autotune"] if args.no_autotune else []
            subprocess.run(cmd, check=True, timeout=3600)
            with open(out) as f:
                per_process.append(json.load(f))
            print(f"\rprocess {p + 1}/{args.processes}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    summary = {}
    for name in args.methods:
        tails = [t for p in per_process for t in p["tails"][name]]
        summary[name] = {
            # Calls whose teardown after the last callback took over 0.1 s.
            "calls_with_slow_teardown": sum(t > SLOW_TEARDOWN_S for t in tails),
            "calls": len(tails),
        }
        if name == "plain":
            continue
        for key, strip in (("", False), ("without_teardown_", True)):
            ratios = [
                [_call(p, name, i, strip) / _call(p, "plain", i, strip) for i in range(args.calls)]
                for p in per_process
            ]
            medians = [statistics.median(r) for r in ratios]
            summary[name].update(
                {
                    key + "median": statistics.median(medians),
                    key + "process_medians": medians,
                    key + "calls_min": min(min(r) for r in ratios),
                    key + "calls_max": max(max(r) for r in ratios),
                }
            )
    result = {
        **_setting(args),
        "steps_per_fit_call": args.fit_steps,
        "processes": args.processes,
        "calls_per_process": args.calls,
        "methods": {k: METHODS[k][0] for k in args.methods},
        "autotune": not args.no_autotune,
        "plain_seconds_per_call": [statistics.median(p["times"]["plain"]) for p in per_process],
        "ratio": summary,
        "seconds_per_call": per_process,
    }
    print(
        f"whole fit calls of {args.fit_steps} steps, {args.processes} processes x "
        f"{args.calls} calls, backend {result['backend']}, batch {args.batch}, "
        f"tf.data autotune {'on' if result['autotune'] else 'off'}, {result['machine']}"
    )
    for name, r in summary.items():
        slow = f"slow teardowns {r['calls_with_slow_teardown']}/{r['calls']}"
        if name == "plain":
            print(f"{METHODS[name][0]:>17}: {slow}")
            continue
        print(
            f"{METHODS[name][0]:>17}: median {r['median']:.3f}x plain; per process "
            f"{min(r['process_medians']):.3f}-{max(r['process_medians']):.3f}; "
            f"single calls {r['calls_min']:.3f}-{r['calls_max']:.3f}; {slow}; "
            f"without teardown: per process "
            f"{min(r['without_teardown_process_medians']):.3f}-"
            f"{max(r['without_teardown_process_medians']):.3f}"
        )
    if args.json:
        write_json(args.json, result)
    return result


def _setting(args):
    """The machine and the settings every result file records."""
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "batch": args.batch,
        "image": args.image,
        "jit": args.jit,
    }


def _compile(model, **kwargs):
    """SGD with momentum (Momentum-SAM needs a momentum buffer), logits."""
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **kwargs,
    )
    return model


def _timed(model, args):
    _compile(
        model,
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
        return 1.0 if isinstance(model, keras_sam.SAMModel) and model.rho > 0 else 0.0

    run.model = model
    run.sam_fraction = sam_fraction
    return run


if __name__ == "__main__":
    main()
