"""Memory of one compiled training step per method, from XLA's own accounting.

Each method's training step (the `jax.jit(model.train_step)` that `fit` runs,
for every kind of step it compiles: a SAM step, a step between SAM steps, a
plain step before `sam_start_epoch`, or the one step that chooses inside) is
lowered and compiled on the JAX backend, and XLA's `memory_analysis()` gives
its temporary buffers; the table reports them per byte of trainable
parameters, with the state each method stores beyond the weights (optimizer
slots, LookSAM's direction, MESA's moving average) per parameter byte, and
whether the compiled step holds a conditional. Deterministic: no timing.

    KERAS_BACKEND=jax python benchmarks/step_memory.py \
        --json benchmarks/results/step_memory_cpu.json

The model is an MLP of four Dense(width) layers (width 256 and 1024: 1 MiB and
16 MiB of float32 parameters) trained with SGD on a batch of 8.
"""

import argparse
import os
import platform
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import benchmarks  # noqa: E402

benchmarks.import_tensorflow_quietly()  # before Keras: no C++ start-up lines

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402
from benchmarks._results import write_json  # noqa: E402
from keras_sam.models import host_steps  # noqa: E402

BATCH = 8
WIDTHS = {"small": 256, "large": 1024}


def mlp(width, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((width,))]
    layers += [keras.layers.Dense(width, activation="relu") for _ in range(3)]
    return keras.Sequential(layers + [keras.layers.Dense(10)])


def sgd(momentum=0.0):
    return keras.optimizers.SGD(0.01, momentum=momentum)


METHODS = {
    # name: (label, wrap(inner) -> model or None for plain Keras, momentum,
    #        the kinds of step its fit compiles)
    "plain": ("plain Keras", None, 0.0, [None]),
    "sam": ("SAM", lambda m: keras_sam.SAMModel(m, rho=0.05), 0.0, [None]),
    "gsam": ("GSAM", lambda m: keras_sam.GSAMModel(m, rho=0.05, alpha=0.1), 0.0, [None]),
    "sam_every5": (
        "SAM every 5",
        lambda m: keras_sam.SAMModel(m, rho=0.05, sam_every=5),
        0.0,
        [host_steps.SAM, host_steps.BETWEEN, host_steps.IN_STEP],
    ),
    "looksam5": (
        "LookSAM every 5",
        lambda m: keras_sam.LookSAMModel(m, rho=0.05, sam_every=5),
        0.0,
        [host_steps.SAM, host_steps.BETWEEN, host_steps.IN_STEP],
    ),
    "late": (
        "late-phase SAM",
        lambda m: keras_sam.SAMModel(m, rho=0.05, sam_start_epoch=1),
        0.0,
        [host_steps.PLAIN, host_steps.SAM],
    ),
    "aesam": ("AE-SAM", lambda m: keras_sam.AESAMModel(m, rho=0.05), 0.0, [None]),
    "plain_momentum": ("plain Keras, SGD momentum", None, 0.9, [None]),
    "msam": ("Momentum-SAM", lambda m: keras_sam.MSAMModel(m, rho=0.3), 0.9, [None]),
    "mesa": ("MESA", lambda m: keras_sam.MESAModel(m), 0.0, [None]),
}

KIND_NAMES = {
    None: "the step",
    host_steps.SAM: "SAM step",
    host_steps.BETWEEN: "step between",
    host_steps.PLAIN: "plain step (before the start epoch)",
}
KIND_NAMES_IN_STEP = "choosing inside (steps_per_execution > 1; every step before 0.4)"


def nbytes(variables):
    return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables))


def step_memory(name, width):
    """`[{kind, temp, stored, parameters, conditional}]` for one method:
    bytes of XLA's temporaries of each compiled kind of step."""
    import jax

    label, wrap, momentum, kinds = METHODS[name]
    inner = mlp(width)
    model = inner if wrap is None else wrap(inner)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=sgd(momentum), loss=loss)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, width)).astype("float32")
    y = rng.integers(0, 10, size=(BATCH,)).astype("int32")
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)  # builds every variable
    parameters = nbytes(inner.trainable_variables)
    own = [v for v in model.non_trainable_variables if all(v is not w for w in inner.weights)]
    stored = nbytes(model.optimizer.variables) + nbytes(own)
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    rows = []
    for kind in kinds:
        step = model.train_step if wrap is None else model.train_step_of_kind(kind)
        compiled = jax.jit(step, donate_argnums=0).lower(state, (x, y)).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        rows.append(
            dict(
                method=name,
                label=label,
                kind=KIND_NAMES_IN_STEP
                if kind is host_steps.IN_STEP and len(kinds) > 1
                else KIND_NAMES[kind],
                temp=int(temp),
                stored=stored,
                parameters=parameters,
                temp_per_parameter_byte=temp / parameters,
                stored_per_parameter_byte=stored / parameters,
                conditional="conditional(" in compiled.as_text(),
            )
        )
    return rows


def machine():
    import jax

    return dict(
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
        device=str(jax.devices()[0].device_kind),
        keras=keras.__version__,
        jax=jax.__version__,
        batch=BATCH,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--json", help="write the results here (replaced only when complete)")
    args = parser.parse_args(argv)
    if keras.backend.backend() != "jax":
        parser.error("XLA's memory accounting needs KERAS_BACKEND=jax")
    results = dict(machine(), sizes={})
    total = len(args.sizes) * len(args.methods)
    done = 0
    for size in args.sizes:
        width = WIDTHS[size]
        rows = []
        for name in args.methods:
            rows += step_memory(name, width)
            done += 1
            print(f"[{done}/{total}] {size} (width {width}): {name}", flush=True)
        results["sizes"][size] = dict(width=width, rows=rows)
    for size, entry in results["sizes"].items():
        print(f"\n{size}: MLP 4 x Dense({entry['width']})")
        print(f"{'method':28s} {'step':38s} temp/param  stored/param  conditional")
        for r in entry["rows"]:
            print(
                f"{r['label']:28s} {r['kind']:38s} {r['temp_per_parameter_byte']:10.2f} "
                f"{r['stored_per_parameter_byte']:13.2f}  {r['conditional']}"
            )
    if args.json:
        write_json(args.json, results, indent=1)
    return results


if __name__ == "__main__":
    main()
