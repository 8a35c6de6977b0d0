"""Images per second of plain Keras training, SAMModel and GSAMModel on the JAX
backend: ResNet-18 (CIFAR stem) on CIFAR-shaped data generated in memory, in
float32 and mixed_bfloat16, all in one run.

With `--minimal`, a hand-written plain step and two-pass SAM step on the same
network (no metrics, no Keras trainer) run in the same rounds, so the cost
keras_sam adds on top of the second gradient evaluation is measured on the
same card. Each model's compiled train step (the same `jax.jit(model.train_step)` that
`fit` uses) runs on device-resident data; rounds of the three models are
interleaved and the medians reported, with the per-round ratios to plain.

    KERAS_BACKEND=jax python benchmarks/gpu_step_cost.py            # GPU: batch 256
    KERAS_BACKEND=jax python benchmarks/gpu_step_cost.py --small    # CPU smoke run, tiny net

One policy per process (`--policies float32`, then `--policies mixed_bfloat16
--merge`) gives both in one file, each run within a shorter time limit.

With `--cheaper`, the cheaper steps join the same rounds: SAM and LookSAM with
the second gradient on one step in five (each step's kind chosen on the host,
one compiled function per kind, as `fit` runs them), Momentum-SAM and MESA (one gradient per
step). Momentum-SAM perturbs along SGD's momentum, so it trains with
SGD(momentum=0.9) and its cost is taken against plain Keras with that optimizer
("plain_momentum"); every other ratio is against plain SGD.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import benchmarks  # noqa: E402

benchmarks.import_tensorflow_quietly()  # before Keras: no C++ start-up lines

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.architectures import resnet18  # noqa: E402
from keras_sam.models import GSAMModel  # noqa: E402
from keras_sam.models import LookSAMModel  # noqa: E402
from keras_sam.models import MESAModel  # noqa: E402
from keras_sam.models import MSAMModel  # noqa: E402
from keras_sam.models import SAMModel  # noqa: E402
from keras_sam.models.engine import StepEngine  # noqa: E402

BASELINES = {"msam": "plain_momentum", "minimal_sam": "minimal_plain"}
"""Methods timed against a baseline other than plain SGD: {method: baseline}."""


def cost_ratios(times):
    """`{method: cost / its baseline's cost}` from `{name: [images/s per round]}`:
    the median over rounds of the baseline's rate over the method's rate (the
    rounds interleave the methods, so each round's ratio compares like with
    like). Baselines (plain, plain_momentum, minimal_plain) get no ratio."""
    baselines = {"plain", *BASELINES.values()}
    return {
        name: statistics.median(b / s for b, s in zip(times[BASELINES.get(name, "plain")], rates))
        for name, rates in times.items()
        if name not in baselines
    }


def tiny_net(input_shape):
    """A two-conv net for smoke runs on a CPU."""
    inputs = keras.Input(input_shape)
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(10)(h))


def compiled_step(model, batch, image, momentum=0.0):
    """Builds everything with one eager step, then returns (step, state, data)."""
    import jax

    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,  # the one build step; the timed step is jitted below
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, image, image, 3)).astype("float32")
    y = rng.integers(0, 10, size=(batch,)).astype("int32")
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    state = jax.tree_util.tree_map(lambda t: jax.numpy.array(t), state)
    data = (jax.device_put(x), jax.device_put(y))
    if not isinstance(model, StepEngine) or model.host_step_kind(0) is None:
        return jax.jit(model.train_step, donate_argnums=0), state, data
    # sam_every / LookSAM: as `fit` runs them, one compiled function per kind
    # of step, the kind of each step chosen on the host from its own count.
    functions = {}
    count = [int(keras.ops.convert_to_numpy(model.optimizer.iterations))]

    def step(state, data):
        kind = model.host_step_kind(count[0])
        count[0] += 1
        if kind not in functions:
            functions[kind] = jax.jit(model.train_step_of_kind(kind), donate_argnums=0)
        return functions[kind](state, data)

    return step, state, data


def minimal_steps(model, batch, image, rho=0.05):
    """A minimal hand-written plain step and two-pass SAM step (no metrics,
    no Keras trainer), the baseline for what keras_sam adds on top of the
    second gradient evaluation. Returns {name: (step, state, data)}."""
    import jax
    import jax.numpy as jnp

    step, state, data = compiled_step(model, batch, image)
    trainable, non_trainable, optimizer_vars, _ = state
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss_and_state(tv, ntv, x, y):
        y_pred, ntv = model.stateless_call(tv, ntv, x, training=True)
        return loss_fn(y, y_pred), ntv

    grad = jax.value_and_grad(loss_and_state, has_aux=True)

    def plain(state, data):
        tv, ntv, ov = state
        (loss, ntv), g = grad(tv, ntv, *data)
        tv, ov = model.optimizer.stateless_apply(ov, g, tv)
        return loss, (tv, ntv, ov)

    def sam(state, data):
        tv, ntv, ov = state
        (loss, new_ntv), g = grad(tv, ntv, *data)
        norm = jnp.sqrt(sum(jnp.sum(gi * gi) for gi in g))
        adv = [w + rho * gi / (norm + 1e-12) for w, gi in zip(tv, g)]
        _, gp = grad(adv, ntv, *data)
        tv, ov = model.optimizer.stateless_apply(ov, gp, tv)
        return loss, (tv, new_ntv, ov)

    copy = lambda: jax.tree_util.tree_map(jnp.array, (trainable, non_trainable, optimizer_vars))
    return {
        "minimal_plain": [jax.jit(plain, donate_argnums=0), copy(), data],
        "minimal_sam": [jax.jit(sam, donate_argnums=0), copy(), data],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--policies", default="float32,mixed_bfloat16")
    parser.add_argument("--small", action="store_true", help="CPU smoke sizes")
    parser.add_argument(
        "--minimal", action="store_true", help="also time a minimal hand-written plain and SAM step"
    )
    parser.add_argument(
        "--cheaper",
        action="store_true",
        help="also time SAMModel(sam_every=5), LookSAMModel(sam_every=5), MSAMModel "
        "(against plain SGD with momentum 0.9) and MESAModel",
    )
    parser.add_argument(
        "--conditional",
        action="store_true",
        help="also time SAMModel(sam_every=10**9): the second gradient never taken after "
        "the first step; before 0.4 that step held a conditional (what it alone cost), "
        "now the steps between run their own compiled function",
    )
    parser.add_argument("--json", help="write the results to this file too")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --json: keep the file's other policies (one run per policy, same card)",
    )
    args = parser.parse_args(argv)
    if keras.backend.backend() != "jax":
        parser.error("run with KERAS_BACKEND=jax")
    network = resnet18
    if args.small:
        args.batch, args.image, args.steps, args.rounds = 8, 16, 5 if args.cheaper else 2, 2
        network = tiny_net
    if args.cheaper and args.steps % 5:
        parser.error("--cheaper needs --steps a multiple of 5 (whole periods of sam_every=5)")
    import jax

    device = jax.devices()[0]
    results = {
        "device": getattr(device, "device_kind", str(device)),
        "platform": platform.machine(),
        "keras": keras.__version__,
        "jax": jax.__version__,
        "batch": args.batch,
        "image": args.image,
        "policies": {},
    }
    for policy in args.policies.split(","):
        keras.mixed_precision.set_global_policy(policy)
        runs = {}
        wrappers = [
            ("plain", lambda m: m),
            ("sam", lambda m: SAMModel(m, rho=0.05)),
            ("gsam", lambda m: GSAMModel(m, rho=0.05, alpha=0.02)),
        ]
        if args.cheaper:
            wrappers += [
                ("sam_every5", lambda m: SAMModel(m, rho=0.05, sam_every=5)),
                ("looksam5", lambda m: LookSAMModel(m, rho=0.05, sam_every=5)),
                ("plain_momentum", lambda m: m),
                ("msam", lambda m: MSAMModel(m, rho=0.3)),
                # kl_start_epoch=-1: the teacher's pass runs from the first step
                ("mesa", lambda m: MESAModel(m, kl_start_epoch=-1)),
            ]
        if args.conditional:
            wrappers.append(("conditional", lambda m: SAMModel(m, rho=0.05, sam_every=10**9)))
        for name, wrap in wrappers:
            keras.utils.set_random_seed(0)
            model = wrap(network(input_shape=(args.image, args.image, 3)))
            momentum = 0.9 if name in ("plain_momentum", "msam") else 0.0
            runs[name] = list(compiled_step(model, args.batch, args.image, momentum))
            print(f"[{policy}] compiled {name}", file=sys.stderr, flush=True)
        if args.minimal:
            keras.utils.set_random_seed(0)
            model = network(input_shape=(args.image, args.image, 3))
            runs.update(minimal_steps(model, args.batch, args.image))
        times = {name: [] for name in runs}
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, run in runs.items():
                step, state, data = run
                jax.block_until_ready(state)
                start = time.perf_counter()
                for _ in range(args.steps):
                    _, state = step(state, data)
                jax.block_until_ready(state)
                run[1] = state
                if r:
                    times[name].append(args.batch * args.steps / (time.perf_counter() - start))
        keras.mixed_precision.set_global_policy("float32")
        ips = {k: statistics.median(v) for k, v in times.items()}
        ratio = cost_ratios(times)
        results["policies"][policy] = {"images_per_second": ips, "cost_ratio": ratio}
        print(
            f"{policy}: plain {ips['plain']:.0f} img/s | SAM {ips['sam']:.0f} img/s "
            f"(x{ratio['sam']:.2f}) | GSAM {ips['gsam']:.0f} img/s (x{ratio['gsam']:.2f})"
        )
        if args.cheaper:
            print(
                f"{policy}: SAM every 5 x{ratio['sam_every5']:.2f} | "
                f"LookSAM every 5 x{ratio['looksam5']:.2f} | "
                f"Momentum-SAM x{ratio['msam']:.2f} (vs SGD momentum) | MESA x{ratio['mesa']:.2f}"
            )
        if args.conditional:
            print(f"{policy}: the conditional alone x{ratio['conditional']:.2f}")
        if args.minimal:
            print(
                f"{policy}: minimal plain {ips['minimal_plain']:.0f} img/s | minimal SAM "
                f"{ips['minimal_sam']:.0f} img/s (x{ratio['minimal_sam']:.2f})"
            )
    print(json.dumps(results, indent=2))
    if args.json:
        if args.merge and os.path.exists(args.json):
            results = merged(json.load(open(args.json)), results)
        with open(args.json + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(args.json + ".tmp", args.json)
    return results


def merged(stored, new):
    """`stored` with the policies of `new` added or replaced; both must come
    from the same device, versions and sizes."""
    same = ("device", "keras", "jax", "batch", "image")
    if any(stored.get(k) != new[k] for k in same):
        raise SystemExit(
            "--merge: the stored results come from another setting "
            + ", ".join(f"{k}={stored.get(k)!r} (now {new[k]!r})" for k in same)
        )
    return dict(stored, policies={**stored["policies"], **new["policies"]})


if __name__ == "__main__":
    main()
