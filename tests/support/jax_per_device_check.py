"""JAX, two forced host devices: the per-device perturbation under
`keras.distribution.DataParallel` against one-device runs. Run by
tests/cross_backend/test_jax_per_device.py in a subprocess (the flags must be set before JAX
starts); prints one JSON line of maximum absolute differences.

    NPROC=8 XLA_FLAGS=--xla_force_host_platform_device_count=2 KERAS_BACKEND=jax \\
        python tests/support/jax_per_device_check.py
"""

import json
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402

D, N, BATCH = 4, 32, 8


def inner(bn=False):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((D,)), keras.layers.Dense(6, activation="tanh")]
    if bn:
        layers.append(keras.layers.BatchNormalization())
    model = keras.Sequential(layers + [keras.layers.Dense(2)])
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:
        v.assign(rng.normal(scale=0.5, size=v.shape).astype("float32"))
    return model


def train(make, distributed, loss_dict=False):
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=keras.distribution.list_devices("cpu"))
        if distributed
        else None
    )
    try:
        model = make(inner())
        model.compile(
            optimizer=keras.optimizers.SGD(0.1), loss="mse", metrics=["mae"], jit_compile=True
        )
        rng = np.random.default_rng(1)
        x = rng.normal(size=(N, D)).astype("float32")
        y = rng.normal(size=(N, 2)).astype("float32")
        history = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        weights = [np.asarray(v.numpy()) for v in model.inner.trainable_variables]
        return weights, history.history
    finally:
        keras.distribution.set_distribution(None)


def max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def main():
    devices = len(keras.distribution.list_devices("cpu"))
    assert devices == 2, devices
    out = {}
    cases = {
        "sam": lambda m, **kw: keras_sam.SAMModel(m, rho=0.2, **kw),
        "gsam": lambda m, **kw: keras_sam.GSAMModel(m, rho=0.2, alpha=0.5, **kw),
        "looksam": lambda m, **kw: keras_sam.LookSAMModel(m, rho=0.2, sam_every=2, **kw),
    }
    for name, make in cases.items():
        # Per device (the default) == one device with one sub-batch per device.
        w_dev, h_dev = train(make, distributed=True)
        if name == "looksam":  # no sub-batches: compare per device on 2 devices to
            # sync_perturbation=True, which must differ (rho is large)
            w_ref, h_ref = train(
                lambda m, make=make: make(m, sync_perturbation=True), distributed=True
            )
            out[f"{name}_per_device_vs_sync"] = max_diff(w_dev, w_ref)
            continue
        w_split, h_split = train(
            lambda m, make=make: make(m, num_batch_splits=devices), distributed=False
        )
        out[f"{name}_per_device_vs_splits"] = max_diff(w_dev, w_split)
        out[f"{name}_logs_vs_splits"] = max(
            abs(h_dev[k][-1] - h_split[k][-1]) for k in ("loss", "mae", "sharpness", "grad_norm")
        )
        # sync_perturbation=True keeps the global behaviour: == one device.
        w_sync, _ = train(lambda m, make=make: make(m, sync_perturbation=True), distributed=True)
        w_one, _ = train(make, distributed=False)
        out[f"{name}_sync_vs_one_device"] = max_diff(w_sync, w_one)
        out[f"{name}_per_device_vs_one_device"] = max_diff(w_dev, w_one)
    # The split check in fit sees each device's shard: 12 / 2 devices = 6
    # rows, which sub-batches of 4 do not divide.
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=keras.distribution.list_devices("cpu"))
    )
    try:
        model = keras_sam.SAMModel(inner(), rho=0.2, sub_batch_size=4)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        x = np.zeros((24, D), "float32")
        model.fit(x, np.zeros((24, 2), "float32"), batch_size=12, verbose=0)
        out["split_check"] = "no error"
    except ValueError as e:
        out["split_check"] = str(e)
    finally:
        keras.distribution.set_distribution(None)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
