"""Momentum-SAM and MESA with the batch ramp and with mixed precision.

The batch ramp inside one `fit` must give the weights (and MESA's average)
of one `fit` call per batch size with `initial_epoch`, the public-API way to
change the batch; mixed_float16 must give the float32 steps to float16
accuracy, with the loss scaled and the momentum read through the
LossScaleOptimizer.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from wrappers import wrap

import keras_sam

N, D, C = 32, 4, 3


def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, D)).astype("float32"), rng.integers(0, C, size=(N,))


def classifier(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(C),
            keras.layers.Activation("linear", dtype="float32"),  # logits in float32
        ]
    )


ONE_GRADIENT = ["msam", "mesa"]


def compiled(model):
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def flat(ts):
    return np.concatenate([np.asarray(t).ravel() for t in ts])


def state_of(model):
    out = [v.numpy() for v in model.inner.weights]
    if isinstance(model, keras_sam.MESAModel):
        out += model.ema_weights()
    return flat(out)


@pytest.mark.parametrize("name", ONE_GRADIENT)
def test_batch_ramp_equals_one_fit_per_batch_size(name):
    x, y = data()

    def dataset_fn(batch):
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)

    ramped = compiled(wrap(name, classifier()))
    scheduler = keras_sam.callbacks.BatchSizeScheduler({0: 4, 1: 8, 2: 16}, dataset_fn)
    history = ramped.fit(dataset_fn(4), epochs=3, callbacks=[scheduler], verbose=0)
    assert history.history["batch_size"] == [4, 8, 16]

    phased = compiled(wrap(name, classifier()))
    for epoch, batch in enumerate((4, 8, 16)):
        phased.fit(dataset_fn(batch), epochs=epoch + 1, initial_epoch=epoch, verbose=0)
    assert int(ramped.optimizer.iterations.numpy()) == 8 + 4 + 2
    np.testing.assert_allclose(state_of(ramped), state_of(phased), rtol=1e-6, atol=1e-7)


@pytest.fixture
def mixed_float16():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


@pytest.mark.parametrize("name", ONE_GRADIENT)
def test_mixed_float16_follows_the_float32_steps(request, name):
    x, y = data()
    reference = compiled(wrap(name, classifier()))
    start = [w.copy() for w in reference.inner.get_weights()]
    reference.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)

    request.getfixturevalue("mixed_float16")
    inner = classifier()
    assert inner.layers[0].compute_dtype == "float16"
    inner.set_weights(start)
    model = compiled(wrap(name, inner))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    moved = flat(reference.inner.get_weights()) - flat(start)
    got = flat(inner.get_weights()) - flat(start)
    # float16 activations: the trajectory to about 1% of its length.
    assert np.abs(got - moved).max() <= 0.02 * np.abs(moved).max() + 1e-3
    if name == "mesa":
        np.testing.assert_allclose(
            flat(model.ema_weights()),
            flat(reference.ema_weights()),
            atol=0.02 * np.abs(moved).max() + 1e-3,
        )
