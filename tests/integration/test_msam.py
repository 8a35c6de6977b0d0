"""Momentum-SAM (`MSAMModel`) against a float64 NumPy replay of the paper's code.

The replay follows the official MSAM optimizer step by step in its own form:
the STORED weights are the perturbed point `w~ = w - rho v/||v||`; each step
takes the gradient there, removes the perturbation, updates the momentum and
the weights, and perturbs again. keras_sam keeps `w` in the model instead; the
two must give the same trajectory of `w`. (Other backends:
tests/backends/test_backends.py; model families: tests/integration/test_model_families.py.)
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from strategies import mirrored

import keras_sam

N, D, BATCH = 32, 4, 8


def data(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(N, D)).astype("float32"), rng.normal(size=(N, 1)).astype("float32"))


def linear(seed=0):
    inner = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1)])
    rng = np.random.default_rng(seed)
    for v in inner.trainable_variables:
        v.assign(rng.normal(scale=0.5, size=v.shape).astype("float32"))
    return inner


def lsq_grad(w, b, xb, yb):
    """Gradient of Keras' mean squared error of `x w + b` in float64."""
    r = xb @ w + b - yb
    return [2 * xb.T @ r / len(xb), 2 * r.mean(axis=0)]


def norm(ts):
    return np.sqrt(sum(np.sum(t * t) for t in ts))


def replay_sgd_msam(w, b, x, y, rho, lr, mu, epochs=1):
    """The official SGD-MSAM `step()` (PyTorch buffers `v <- mu v + g`)."""
    p = [w.astype(np.float64), b.astype(np.float64)]  # stored: the perturbed point
    v = [np.zeros_like(t) for t in p]
    inv = 0.0
    for _ in range(epochs):
        for s in range(0, N, BATCH):
            g = lsq_grad(
                *p, x[s : s + BATCH].astype(np.float64), y[s : s + BATCH].astype(np.float64)
            )
            for i in range(2):
                p[i] = p[i] + rho * inv * v[i]  # back to w
                v[i] = mu * v[i] + g[i]
                p[i] = p[i] - lr * v[i]
            inv = 1.0 / (norm(v) + 1e-12)
            p = [t - rho * inv * vi for t, vi in zip(p, v)]  # perturbed again
    return [t + rho * inv * vi for t, vi in zip(p, v)]  # the unperturbed w


def replay_adam_msam(w, b, x, y, rho, lr, b1=0.9, b2=0.999, eps=1e-7):
    """AdamW-MSAM's perturbation along the first moment `m` (paper's code)
    with the Adam update as Keras defines it."""
    p = [w.astype(np.float64), b.astype(np.float64)]
    m = [np.zeros_like(t) for t in p]
    u = [np.zeros_like(t) for t in p]
    for t, s in enumerate(range(0, N, BATCH), start=1):
        factor = rho / (norm(m) + 1e-12)
        adv = [pi - factor * mi for pi, mi in zip(p, m)]
        g = lsq_grad(*adv, x[s : s + BATCH].astype(np.float64), y[s : s + BATCH].astype(np.float64))
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        for i in range(2):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            u[i] = b2 * u[i] + (1 - b2) * g[i] ** 2
            p[i] = p[i] - alpha * m[i] / (np.sqrt(u[i]) + eps)
    return p


def flat(model):
    return np.concatenate([v.numpy().ravel() for v in model.trainable_variables])


@pytest.mark.parametrize("epochs", [1, 3])
def test_sgd_momentum_matches_the_papers_update(epochs):
    x, y = data()
    inner = linear()
    w0, b0 = (v.numpy() for v in inner.trainable_variables)
    model = keras_sam.MSAMModel(inner, rho=0.3)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    history = model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    expected = replay_sgd_msam(w0, b0, x, y, rho=0.3, lr=0.05, mu=0.9, epochs=epochs)
    np.testing.assert_allclose(
        flat(inner), np.concatenate([t.ravel() for t in expected]), rtol=1e-5, atol=1e-6
    )
    assert set(history.history) == {"loss", "grad_norm", "rho"}
    np.testing.assert_allclose(history.history["rho"], 0.3, rtol=1e-6)


def test_one_step_is_the_plain_step_and_the_second_uses_the_momentum():
    """First step: v = 0, the gradient at w. Second: at w - rho v/||v||."""
    x, y = data()
    inner = linear()
    w0, b0 = (v.numpy().astype(np.float64) for v in inner.trainable_variables)
    model = keras_sam.MSAMModel(inner, rho=0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.5), loss="mse")
    model.train_on_batch(x[:BATCH], y[:BATCH])
    g0 = lsq_grad(w0, b0, x[:BATCH], y[:BATCH])
    w1 = [w0 - 0.1 * g0[0], b0 - 0.1 * g0[1]]
    np.testing.assert_allclose(
        flat(inner), np.concatenate([t.ravel() for t in w1]), rtol=1e-5, atol=1e-6
    )
    model.train_on_batch(x[BATCH : 2 * BATCH], y[BATCH : 2 * BATCH])
    v = g0  # torch buffer after step 1
    adv = [a - 0.5 * vi / norm(v) for a, vi in zip(w1, v)]
    g1 = lsq_grad(*adv, x[BATCH : 2 * BATCH], y[BATCH : 2 * BATCH])
    v = [0.5 * a + b for a, b in zip(v, g1)]
    w2 = [a - 0.1 * vi for a, vi in zip(w1, v)]
    np.testing.assert_allclose(
        flat(inner), np.concatenate([t.ravel() for t in w2]), rtol=1e-5, atol=1e-6
    )


def test_adam_perturbs_along_the_first_moment():
    x, y = data()
    inner = linear()
    w0, b0 = (v.numpy() for v in inner.trainable_variables)
    model = keras_sam.MSAMModel(inner, rho=0.2)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    expected = replay_adam_msam(w0, b0, x, y, rho=0.2, lr=0.01)
    np.testing.assert_allclose(
        flat(inner), np.concatenate([t.ravel() for t in expected]), rtol=1e-5, atol=1e-6
    )


def cnn(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3, seed=1),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_rho_zero_is_plain_keras_exactly(optimizer):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(24, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, size=(24,))

    def make_optimizer():
        if optimizer == "adam":
            return keras.optimizers.Adam(0.01)
        return keras.optimizers.SGD(0.1, momentum=0.9)

    def run(wrap):
        inner = cnn()
        model = keras_sam.MSAMModel(inner, rho=0.0) if wrap else inner
        model.compile(
            optimizer=make_optimizer(),
            metrics=["accuracy"],
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        h = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        return inner, h.history

    plain, hp = run(False)
    msam, hm = run(True)
    for a, b in zip(plain.variables, msam.variables):  # BatchNorm statistics too
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert hp["loss"] == hm["loss"] and hp["accuracy"] == hm["accuracy"]


@pytest.mark.parametrize(
    "optimizer, match",
    [
        (lambda: keras.optimizers.SGD(0.1), "momentum"),
        (lambda: keras.optimizers.RMSprop(0.1), "RMSprop"),
    ],
)
def test_an_optimizer_without_momentum_fails_before_training(optimizer, match):
    x, y = data()
    inner = linear()
    before = flat(inner)
    model = keras_sam.MSAMModel(inner)
    model.compile(optimizer=optimizer(), loss="mse")
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    np.testing.assert_array_equal(flat(inner), before)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rho=-1.0), "rho"),
        (dict(adaptive=True), "adaptive"),
        (dict(sam_every=2), "sam_every"),
        (dict(num_batch_splits=2), "num_batch_splits"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_sam.MSAMModel(linear(), **kwargs)


def test_save_load_and_resume_like_an_uninterrupted_run(tmp_path):
    """The momentum lives in the optimizer, which `save` keeps."""
    x, y = data()

    def fresh():
        model = keras_sam.MSAMModel(linear(), rho=0.4)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
        return model

    whole = fresh()
    whole.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    part = fresh()
    part.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    part.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded) is keras_sam.MSAMModel and loaded.rho == 0.4
    loaded.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(flat(loaded), flat(whole), rtol=1e-6, atol=1e-7)


def test_two_replicas_equal_one_device():
    """Every replica perturbs along the same (all-reduced) momentum."""
    x, y = data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)

    def run(strategy):
        with strategy.scope():
            model = keras_sam.MSAMModel(linear(), rho=0.3)
            model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
        history = model.fit(ds, epochs=2, verbose=0)
        return model, history.history

    one, h1 = run(tf.distribute.get_strategy())
    two, h2 = run(mirrored(2))
    np.testing.assert_allclose(flat(two), flat(one), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h2["loss"], h1["loss"], rtol=1e-5)
