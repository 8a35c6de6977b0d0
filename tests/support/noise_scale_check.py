"""The gradient noise scale estimate and the adaptive batch on the backend
named by KERAS_BACKEND; writes what it got as JSON.

Used by tests/integration/test_noise_scale.py and
tests/integration/test_adaptive_batch_size.py, once per backend, in a
subprocess (a Keras backend is fixed per process); on JAX also under
`keras.distribution.DataParallel` over two forced host devices.

    KERAS_BACKEND=jax python tests/support/noise_scale_check.py OUT.json [--data-parallel]

Cases (`least_squares` gives the data; the weights never move, lr 0):
- `sam`, `plain` (rho 0), `gsam`: one part per replica; on one device the
  halves of each batch, under DataParallel the two devices' shards;
- `splits`: `num_batch_splits=4`;
- `adaptive`: `AdaptiveBatchSize` with a cosine rate on a linear model with
  rho 0 (the logged batch sizes and noise scales, and the final weights);
- `adaptive_resumed`: the same run stopped at the start of epoch RESUME_EPOCH
  under BackupAndRestore and resumed by a model built anew.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from interrupts import Interrupt  # noqa: E402  (tests/support, this script's folder)
from interrupts import InterruptAt  # noqa: E402
from wrappers import wrap  # noqa: E402

import keras_sam  # noqa: E402

D, NOISE, BATCH, STEPS, DECAY = 5, 0.5, 64, 800, 0.999
ADAPTIVE_N, ADAPTIVE_EPOCHS, LR, LR_FINAL, THRESHOLD, MIN_EPOCHS = 256, 8, 0.01, 0.001, 0.5, 2
RESUME_EPOCH = 5


def least_squares(seed=0):
    """`(x, y, w0)`: y = x.w* + eps, eps ~ N(0, NOISE^2), and w0 = w* + delta
    with |delta| = 1, where the weights stay."""
    rng = np.random.default_rng(seed)
    w_star = rng.normal(size=D)
    delta = rng.normal(size=D)
    delta /= np.linalg.norm(delta)
    x = rng.normal(size=(STEPS * BATCH, D)).astype("float32")
    y = (x @ w_star + NOISE * rng.normal(size=STEPS * BATCH)).astype("float32")[:, None]
    return x, y, (w_star + delta).astype("float32")


def linear(w0):
    inner = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1, use_bias=False)])
    inner.layers[0].kernel.assign(w0[:, None])
    return inner


CASES = {
    # case: (method, settings over tests/support/wrappers.py's)
    "sam": ("sam", {}),
    "plain": ("sam", dict(rho=0.0)),
    "gsam": ("gsam", {}),
    "splits": ("sam", dict(num_batch_splits=4)),
}


def noise_case(name):
    x, y, w0 = least_squares()
    method, settings = CASES[name]
    model = wrap(method, linear(w0), noise_scale=True, noise_scale_decay=DECAY, **settings)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return {"noise_scale": float(history.history["noise_scale"][-1])}


def adaptive_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(ADAPTIVE_N, D)).astype("float32")
    y = (x @ rng.normal(size=D) + NOISE * rng.normal(size=ADAPTIVE_N)).astype("float32")
    return x, y[:, None]


def adaptive_case(backup=None, interrupt_at=None):
    """The adaptive batch's run; with `backup`, under BackupAndRestore in that
    folder, stopped at the start of epoch `interrupt_at` when given (then it
    returns None)."""
    import tensorflow as tf

    x, y = adaptive_data()

    def dataset_fn(batch_size):
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size, drop_remainder=True)

    policy = keras_sam.callbacks.AdaptiveBatchSize(
        4, max_batch_size=64, threshold=THRESHOLD, min_epochs=MIN_EPOCHS
    )
    scheduler = keras_sam.callbacks.BatchSizeScheduler(policy, dataset_fn)
    lr = keras_sam.schedules.CosineAnnealing(
        LR, LR_FINAL, ADAPTIVE_EPOCHS, scheduler.steps_per_epoch(ADAPTIVE_EPOCHS)
    )
    inner = linear(np.zeros(D, "float32"))
    model = keras_sam.SAMModel(inner, rho=0.0, noise_scale=True, noise_scale_decay=0.9)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    callbacks = [scheduler]
    if backup is not None:
        callbacks.append(keras.callbacks.BackupAndRestore(backup))
    if interrupt_at is not None:
        callbacks.append(InterruptAt(interrupt_at))
    try:
        history = model.fit(
            dataset_fn(4), epochs=ADAPTIVE_EPOCHS, callbacks=callbacks, shuffle=False, verbose=0
        )
    except Interrupt:
        return None
    return {
        "batch_size": [int(b) for b in history.history["batch_size"]],
        "next_batch_size": [int(b) for b in history.history["next_batch_size"]],
        "noise_scale": [float(v) for v in history.history["noise_scale"]],
        "kernel": keras.ops.convert_to_numpy(inner.layers[0].kernel).ravel().tolist(),
    }


def adaptive_resumed():
    """The adaptive run stopped at the start of epoch RESUME_EPOCH and resumed by
    BackupAndRestore in a model built anew: the epochs after the stop."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        backup = os.path.join(folder, "backup")
        assert adaptive_case(backup, interrupt_at=RESUME_EPOCH) is None
        return adaptive_case(backup)


def main(out, data_parallel):
    if data_parallel:
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    results = {name: noise_case(name) for name in CASES}
    if not data_parallel:
        results["adaptive"] = adaptive_case()
        results["adaptive_resumed"] = adaptive_resumed()
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], "--data-parallel" in sys.argv[2:])
