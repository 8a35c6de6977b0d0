"""Tests of keras_sam.sharpness and SharpnessMonitor against closed forms.

A single Dense(1) layer with MSE is least squares: with A = [X 1] (or X without
bias), residuals r = A w - y and n examples,

- gradient of the mean loss: (2/n) A^T r,
- Hessian: (2/n) A^T A,
- L_B(w + d) - L_B(w) = (2/n_B) r_B^T A_B d + (1/n_B) ||A_B d||^2, a convex
  function of d whose maximum over a box is at a vertex (enumerated here).

Batches are unequal (32, 32, 32, 4) so that per-batch averaging mistakes show.
"""

import itertools
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from strategies import mirrored

from keras_sam import sharpness
from keras_sam.callbacks.sharpness_monitor import SharpnessMonitor

N, BATCH = 100, 32
COLUMN_SCALES = np.array([3.0, 1.0, 0.5, 0.2])


def _data(d, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((N, d)) * COLUMN_SCALES[:d]).astype("float32")
    y = rng.standard_normal((N, 1)).astype("float32")
    return x, y


def _linear_model(d, use_bias, seed=1):
    rng = np.random.default_rng(seed)
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(1, use_bias=use_bias)])
    weights = [rng.standard_normal((d, 1)).astype("float32")]
    if use_bias:
        weights.append(np.array([0.3], dtype="float32"))
    model.set_weights(weights)
    return model


def _design(model, x):
    """A and w in float64 (bias column last)."""
    weights = model.get_weights()
    w = weights[0].astype("float64").ravel()
    a = x.astype("float64")
    if len(weights) == 2:
        w = np.concatenate([w, weights[1].astype("float64")])
        a = np.hstack([a, np.ones((len(x), 1))])
    return a, w


def _batches_of(arrays, size=BATCH):
    n = len(arrays[0])
    return [tuple(a[s : s + size] for a in arrays) for s in range(0, n, size)]


def _exact_worst_case(a, w, y, rho, adaptive):
    r = a @ w - y[:, 0].astype("float64")
    box = rho * (np.abs(w) if adaptive else np.ones_like(w))
    gains = []
    for start in range(0, len(a), BATCH):
        ab, rb = a[start : start + BATCH], r[start : start + BATCH]
        best = 0.0
        for signs in itertools.product((-1.0, 1.0), repeat=len(w)):
            delta = box * np.array(signs)
            gain = np.mean((rb + ab @ delta) ** 2) - np.mean(rb**2)
            best = max(best, gain)
        gains.append(best)
    return float(np.mean(gains))


CASES = [(3, True), (4, False)]  # d + bias = 4 -> 16 vertices


# ---------------------------------------------------------------------------
# Closed forms.


@pytest.mark.parametrize("d,use_bias", CASES)
def test_full_gradient_norm_closed_form(d, use_bias):
    x, y = _data(d)
    model = _linear_model(d, use_bias)
    a, w = _design(model, x)
    exact = np.linalg.norm(2.0 / N * a.T @ (a @ w - y[:, 0]))
    got = sharpness.full_gradient_norm(model, (x, y), "mse", batch_size=BATCH)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, exact, rtol=1e-5)
    # Same from a tf.data.Dataset, a list of batches and a generator.
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    np.testing.assert_allclose(
        sharpness.full_gradient_norm(model, ds, keras.losses.MeanSquaredError()),
        exact,
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        sharpness.full_gradient_norm(model, _batches_of((x, y)), keras.losses.mean_squared_error),
        exact,
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        sharpness.full_gradient_norm(model, iter(_batches_of((x, y))), "mse"),
        exact,
        rtol=1e-5,
    )


def test_full_gradient_norm_sample_weights_and_regularizer():
    d = 3
    x, y = _data(d)
    sw = np.random.default_rng(5).uniform(0.1, 2.0, N).astype("float32")
    model = _linear_model(d, True)
    a, w = _design(model, x)
    r = a @ w - y[:, 0]

    # "sum_over_batch_size": sum(sw * r^2) / n.
    exact = np.linalg.norm(2.0 / N * a.T @ (sw * r))
    got = sharpness.full_gradient_norm(model, (x, y, sw), "mse", batch_size=BATCH)
    np.testing.assert_allclose(got, exact, rtol=1e-5)
    # "mean_with_sample_weight": sum(sw * r^2) / sum(sw).
    exact = np.linalg.norm(2.0 / sw.astype("float64").sum() * a.T @ (sw * r))
    loss = keras.losses.MeanSquaredError(reduction="mean_with_sample_weight")
    got = sharpness.full_gradient_norm(model, _batches_of((x, y, sw)), loss)
    np.testing.assert_allclose(got, exact, rtol=1e-5)

    # A kernel regularizer counts only with include_model_losses=True.
    c = 0.1
    reg = keras.Sequential(
        [
            keras.Input((d,)),
            keras.layers.Dense(1, kernel_regularizer=keras.regularizers.L2(c)),
        ]
    )
    reg.set_weights(model.get_weights())
    grad = 2.0 / N * a.T @ r
    np.testing.assert_allclose(
        sharpness.full_gradient_norm(reg, (x, y), "mse", batch_size=BATCH),
        np.linalg.norm(grad),
        rtol=1e-5,
    )
    grad[:d] += 2.0 * c * w[:d]
    np.testing.assert_allclose(
        sharpness.full_gradient_norm(
            reg, (x, y), "mse", batch_size=BATCH, include_model_losses=True
        ),
        np.linalg.norm(grad),
        rtol=1e-5,
    )


@pytest.mark.parametrize("d,use_bias", CASES)
def test_hessian_max_eigenvalue_closed_form(d, use_bias):
    x, y = _data(d)
    model = _linear_model(d, use_bias)
    a, _ = _design(model, x)
    exact = np.linalg.eigvalsh(2.0 / N * a.T @ a).max()
    got = sharpness.hessian_max_eigenvalue(
        model, (x, y), "mse", iterations=100, tol=1e-10, batch_size=BATCH
    )
    assert isinstance(got, float)
    np.testing.assert_allclose(got, exact, rtol=1e-4)


def test_hessian_eigenvalue_keeps_its_sign():
    x, y = _data(3)
    model = _linear_model(3, True)
    a, _ = _design(model, x)
    exact = -np.linalg.eigvalsh(2.0 / N * a.T @ a).max()

    def negative_mse(y_true, y_pred):  # per-example values
        return -keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)

    got = sharpness.hessian_max_eigenvalue(
        model, (x, y), negative_mse, iterations=100, tol=1e-10, batch_size=BATCH
    )
    np.testing.assert_allclose(got, exact, rtol=1e-4)


def _close_eigenvalue_problem(d, seed=0):
    """Least squares (no bias) whose Hessian 2/N X^T X has top eigenvalues
    8.97 and 8.50 (ratio 0.95), plus `d - 2` smaller ones."""
    rng = np.random.default_rng(seed)
    if d == 6:
        eigenvalues = np.array([8.97, 8.5, 3.0, 1.5, 0.7, 0.2])
    else:
        eigenvalues = np.concatenate([[8.97, 8.5], np.linspace(0.05, 8.0, d - 2)])
    u, _ = np.linalg.qr(rng.standard_normal((N, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    x = ((u * np.sqrt(eigenvalues * N / 2.0)) @ v.T).astype("float32")
    y = rng.standard_normal((N, 1)).astype("float32")
    model = _linear_model(d, False)
    a, _ = _design(model, x)
    return model, x, y, 2.0 / N * a.T @ a


def _power_iteration(h, iterations=20, tol=1e-5, seed=0):
    """The former algorithm (stops when the estimate changes by <= tol)."""
    v = np.random.default_rng(seed).standard_normal(len(h))
    v /= np.linalg.norm(v)
    estimate = None
    for _ in range(iterations):
        product = h @ v
        previous, estimate = estimate, float(product @ v)
        if previous is not None and abs(estimate - previous) <= tol * abs(estimate):
            break
        v = product / np.linalg.norm(product)
    return estimate


def _flat(arrays):
    return np.concatenate([a.ravel() for a in arrays])


def test_hessian_max_eigenvalue_lanczos_defaults_and_info():
    model, x, y, h = _close_eigenvalue_problem(6)
    exact = np.linalg.eigvalsh(h)
    np.testing.assert_allclose(exact[-2:], [8.5, 8.97], rtol=1e-5)
    got, info = sharpness.hessian_max_eigenvalue(
        model, (x, y), "mse", batch_size=BATCH, return_info=True
    )
    assert isinstance(got, float)
    assert got == sharpness.hessian_max_eigenvalue(model, (x, y), "mse", batch_size=BATCH)
    np.testing.assert_allclose(got, exact[-1], rtol=1e-3)
    assert type(info["num_hvps"]) is int and 1 <= info["num_hvps"] <= 20
    assert info["converged"]
    assert info["residual"] <= 1e-5 * abs(got)
    # The residual criterion, checked with the exact Hessian.
    assert [e.shape for e in info["eigenvector"]] == [
        tuple(w.shape) for w in model.trainable_variables
    ]
    v = _flat(info["eigenvector"])
    np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-10)
    assert np.linalg.norm(h @ v - got * v) <= 1e-5 * abs(got)

    # `iterations` bounds the count; the Krylov dimension is at most the
    # number of parameters (6).
    _, info = sharpness.hessian_max_eigenvalue(
        model, (x, y), "mse", iterations=3, tol=0.0, return_info=True
    )
    assert info["num_hvps"] == 3 and not info["converged"]
    got, info = sharpness.hessian_max_eigenvalue(
        model, (x, y), "mse", iterations=100, tol=0.0, return_info=True
    )
    assert info["num_hvps"] == 6 and info["converged"]
    np.testing.assert_allclose(got, exact[-1], rtol=1e-5)
    # A non-finite Hessian-vector product gives NaN, not a made-up value.
    x_nan = x.copy()
    x_nan[0, 0] = np.nan
    got, info = sharpness.hessian_max_eigenvalue(model, (x_nan, y), "mse", return_info=True)
    assert np.isnan(got) and info["num_hvps"] == 1 and not info["converged"]


@pytest.mark.parametrize("d,seed", [(6, 0), (6, 7), (40, 0), (40, 3)])
def test_hessian_max_eigenvalue_close_top_eigenvalues(d, seed):
    model, x, y, h = _close_eigenvalue_problem(d, seed)
    exact = np.linalg.eigvalsh(h)[-1]
    # Power iteration with the same budget failed here.
    assert abs(_power_iteration(h) / exact - 1) > 1e-3
    got, info = sharpness.hessian_max_eigenvalue(
        model, (x, y), "mse", batch_size=BATCH, return_info=True
    )
    np.testing.assert_allclose(got, exact, rtol=1e-3)
    assert type(info["num_hvps"]) is int and 1 <= info["num_hvps"] <= 20
    # The reported residual is that of the returned pair.
    v = _flat(info["eigenvector"])
    np.testing.assert_allclose(
        np.linalg.norm(h @ v - got * v),
        info["residual"],
        rtol=1e-2,
        atol=1e-6 * abs(got),
    )
    if info["converged"]:
        assert info["residual"] <= 1e-5 * abs(got)


@pytest.mark.parametrize(
    "d,use_bias,rho,adaptive",
    [
        (3, True, 2e-4, False),
        (3, True, 0.05, False),
        (4, False, 0.05, True),
        (3, True, 0.5, True),
        (4, False, 0.5, False),
    ],
)
def test_worst_case_sharpness_vertex_enumeration(d, use_bias, rho, adaptive):
    x, y = _data(d)
    model = _linear_model(d, use_bias)
    a, w = _design(model, x)
    exact = _exact_worst_case(a, w, y, rho, adaptive)
    got = sharpness.worst_case_sharpness(
        model, (x, y), "mse", rho=rho, adaptive=adaptive, batch_size=BATCH
    )
    assert isinstance(got, float)
    assert got >= 0.0
    # Reached inside the box: at most the exact maximum (float32 noise aside).
    assert got <= exact * (1 + 1e-3) + 1e-6
    assert got >= 0.99 * exact


def test_worst_case_sharpness_zero_radius_and_one_iteration():
    x, y = _data(3)
    model = _linear_model(3, True)
    assert sharpness.worst_case_sharpness(model, (x, y), "mse", rho=0.0) == 0.0
    a, w = _design(model, x)
    got = sharpness.worst_case_sharpness(
        model, (x, y), "mse", rho=0.05, iterations=1, batch_size=BATCH
    )
    assert 0.0 <= got <= _exact_worst_case(a, w, y, 0.05, False) * (1 + 1e-3)


# ---------------------------------------------------------------------------
# State and distribution.


def _bn_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(
                6, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-3)
            ),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(1),
        ]
    )
    return model


def _all_state(model):
    variables = list(model.variables) + list(model.optimizer.variables)
    return [np.array(v.numpy()) for v in variables]


def test_measures_leave_all_state_bitwise_unchanged():
    x, y = _data(3)
    model = _bn_model()
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    before = _all_state(model)
    # Equal batches here (one trace each): unequal ones are tested above.
    kwargs = dict(batch_size=50, include_model_losses=True)
    sharpness.worst_case_sharpness(model, (x, y), "mse", rho=0.05, adaptive=True, **kwargs)
    sharpness.full_gradient_norm(model, (x, y), "mse", **kwargs)
    sharpness.hessian_max_eigenvalue(model, (x, y), "mse", iterations=3, **kwargs)
    after = _all_state(model)
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert b.dtype == a.dtype and np.array_equal(b, a)


def _measure_all(model, x, y):
    return np.array(
        [
            sharpness.worst_case_sharpness(model, (x, y), "mse", rho=0.05, batch_size=50),
            sharpness.full_gradient_norm(model, (x, y), "mse", batch_size=50),
            sharpness.hessian_max_eigenvalue(model, (x, y), "mse", iterations=5, batch_size=50),
        ]
    )


def test_mirrored_strategy_model_gives_same_values():
    x, y = _data(3)
    single = _bn_model()
    single.compile("sgd", "mse")
    single.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    strategy = mirrored(2)
    with strategy.scope():
        distributed = _bn_model()
        distributed.compile("sgd", "mse")
    distributed.set_weights(single.get_weights())
    expected = _measure_all(single, x, y)
    before = [v.numpy() for v in distributed.variables]
    np.testing.assert_allclose(_measure_all(distributed, x, y), expected, rtol=1e-6)
    with strategy.scope():  # Cross-replica context inside the scope too.
        np.testing.assert_allclose(_measure_all(distributed, x, y), expected, rtol=1e-6)
    for b, v in zip(before, distributed.variables):
        for local in v.value.values:  # Every replica's copy untouched.
            assert np.array_equal(b, local.numpy())


# ---------------------------------------------------------------------------
# SharpnessMonitor.


class DelegatingModel(keras.Model):
    """A model that delegates its call to `inner`, like keras_sam.SAMModel."""

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, inputs, training=None):
        return self.inner(inputs, training=training)


@pytest.mark.parametrize("wrapped", [False, True])
def test_sharpness_monitor_logs_every_second_epoch(wrapped):
    x, y = _data(3)
    model = _linear_model(3, True)
    if wrapped:
        model = DelegatingModel(model)
        model(x[:1])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    measured = (x[:64], y[:64])
    monitor = SharpnessMonitor(
        measured,
        every=2,
        rho=0.05,
        measures=sharpness.MEASURES,
        hessian_iterations=5,
        batch_size=BATCH,
    )
    seen_keys, weights = [], []
    spy = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: (
            seen_keys.append(set(logs)),
            weights.append(model.get_weights()),
        )
    )
    history = model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0, callbacks=[monitor, spy])
    assert len(seen_keys) == 3
    for epoch, keys in enumerate(seen_keys):
        present = set(sharpness.MEASURES) & keys
        assert present == (set(sharpness.MEASURES) if epoch == 1 else set())
    for name in sharpness.MEASURES:
        assert len(history.history[name]) == 1
    assert list(monitor.results) == [1]

    fresh = _linear_model(3, True)
    fresh.set_weights(weights[1])
    expected = {
        "worst_case_sharpness": sharpness.worst_case_sharpness(
            fresh, measured, "mse", rho=0.05, batch_size=BATCH
        ),
        "full_gradient_norm": sharpness.full_gradient_norm(
            fresh, measured, "mse", batch_size=BATCH
        ),
        "hessian_max_eigenvalue": sharpness.hessian_max_eigenvalue(
            fresh, measured, "mse", iterations=5, batch_size=BATCH
        ),
    }
    for name, value in expected.items():
        np.testing.assert_allclose(history.history[name][0], value, rtol=1e-6)


def test_sharpness_monitor_fill_value_and_prefix():
    x, y = _data(3)
    model = _linear_model(3, True)
    model.compile("sgd", "mse")
    monitor = SharpnessMonitor(
        (x, y),
        every=2,
        measures="full_gradient_norm",
        prefix="train_",
        fill_value=float("nan"),
    )
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[monitor])
    values = history.history["train_full_gradient_norm"]
    assert len(values) == 2 and np.isnan(values[0]) and values[1] > 0


# ---------------------------------------------------------------------------
# Bad inputs.


def test_bad_inputs_raise_value_error_naming_the_argument():
    x, y = _data(3)
    model = _linear_model(3, True)
    data = (x, y)
    with pytest.raises(ValueError, match="rho"):
        sharpness.worst_case_sharpness(model, data, "mse", rho=-1.0)
    with pytest.raises(ValueError, match="iterations"):
        sharpness.worst_case_sharpness(model, data, "mse", iterations=0)
    with pytest.raises(ValueError, match="iterations"):
        sharpness.hessian_max_eigenvalue(model, data, "mse", iterations=0)
    for fn in (
        sharpness.worst_case_sharpness,
        sharpness.full_gradient_norm,
        sharpness.hessian_max_eigenvalue,
    ):
        with pytest.raises(ValueError, match="data"):
            fn(model, [], "mse")
        with pytest.raises(ValueError, match="data"):
            fn(model, (x[:0], y[:0]), "mse")
        with pytest.raises(ValueError, match="model"):
            fn(keras.Sequential([keras.layers.Dense(1)]), data, "mse")
        with pytest.raises(ValueError, match="model"):
            fn(keras.layers.Dense(1), data, "mse")
        with pytest.raises(ValueError, match="loss"):
            fn(model, data, None)
    with pytest.raises(ValueError, match="every"):
        SharpnessMonitor(data, every=0)
    with pytest.raises(ValueError, match="measures"):
        SharpnessMonitor(data, measures=("flatness",))
    with pytest.raises(ValueError, match="rho"):
        SharpnessMonitor(data, rho=-0.1)
    with pytest.raises(ValueError, match="data"):
        SharpnessMonitor(b for b in _batches_of(data))


def test_sharpness_monitor_writes_to_tensorboard(tmp_path):
    """The measures reach TensorBoard's event files with History's values."""
    pytest.importorskip("tensorboard")
    x, y = _data(3)
    model = _linear_model(3, True)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    monitor = SharpnessMonitor((x, y), measures="full_gradient_norm", batch_size=BATCH)
    board = keras.callbacks.TensorBoard(str(tmp_path))
    history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[monitor, board])
    logged = {}
    for root, _, files in os.walk(tmp_path / "train"):
        for name in files:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                for value in event.summary.value:
                    if value.tag == "epoch_full_gradient_norm":
                        logged[event.step] = float(tf.make_ndarray(value.tensor))
    assert sorted(logged) == [0, 1]
    np.testing.assert_allclose(
        [logged[0], logged[1]], history.history["full_gradient_norm"], rtol=1e-6
    )


# ---------------------------------------------------------------------------
# NumPy scalars: the same measures as with Python scalars.

# (float type, int type); 2**-8 and 2**-20 are exact in float32.
NUMPY_TYPES = [
    (np.float32, np.int32),
    (np.float64, np.int64),
    (lambda v: np.array(v, "float32"), lambda v: np.array(v, "int64")),
]


@pytest.mark.parametrize("float_type,int_type", NUMPY_TYPES)
def test_numpy_scalar_arguments_give_the_same_values(float_type, int_type):
    x, y = _data(3)
    model = _linear_model(3, True)
    calls = [
        (sharpness.worst_case_sharpness, dict(rho=2**-8, iterations=5, batch_size=BATCH, steps=3)),
        (sharpness.worst_case_sharpness, dict(rho=0.0, iterations=2, adaptive=True)),
        (sharpness.full_gradient_norm, dict(batch_size=BATCH, steps=3)),
        (
            sharpness.hessian_max_eigenvalue,
            dict(iterations=4, tol=2**-20, seed=3, batch_size=BATCH, steps=3),
        ),
    ]
    for fn, kwargs in calls:
        as_numpy = {
            k: v if isinstance(v, bool) else (int_type(v) if isinstance(v, int) else float_type(v))
            for k, v in kwargs.items()
        }
        if "seed" in as_numpy:  # passed to np.random.default_rng: no 0-d array
            as_numpy["seed"] = np.int64(kwargs["seed"])
        assert fn(model, (x, y), "mse", **as_numpy) == fn(model, (x, y), "mse", **kwargs)


@pytest.mark.parametrize("float_type,int_type", NUMPY_TYPES)
def test_sharpness_monitor_numpy_scalar_arguments(float_type, int_type):
    x, y = _data(3)
    model = _linear_model(3, True)
    kwargs = dict(
        every=2,
        rho=2**-8,
        iterations=3,
        hessian_iterations=2,
        hessian_tol=2**-20,
        seed=1,
        batch_size=BATCH,
        steps=2,
        measures=sharpness.MEASURES,
        fill_value=0.5,
    )
    as_numpy = {
        k: v if isinstance(v, tuple) else (int_type(v) if isinstance(v, int) else float_type(v))
        for k, v in kwargs.items()
    }
    as_numpy["measures"] = tuple(np.str_(m) for m in sharpness.MEASURES)
    as_numpy["adaptive"] = np.bool_(False)
    expected = SharpnessMonitor((x, y), "mse", **kwargs)
    got = SharpnessMonitor((x, y), "mse", **as_numpy)
    config = got.get_config()
    assert config == expected.get_config()
    assert json.dumps(config) == json.dumps(expected.get_config())
    assert got.measure(model) == expected.measure(model)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(rho=np.float32(-0.5)), "rho"),
        (dict(rho="0.1"), "rho"),
        (dict(iterations=np.float64(5.0)), "iterations"),
        (dict(iterations=np.bool_(True)), "iterations"),
        (dict(batch_size=np.int64(0)), "batch_size"),
        (dict(steps=np.float32(2.0)), "steps"),
    ],
    ids=repr,
)
def test_bad_numpy_arguments_name_the_argument(kwargs, arg):
    x, y = _data(3)
    model = _linear_model(3, True)
    with pytest.raises(ValueError, match=f"^`{arg}` must be"):
        sharpness.worst_case_sharpness(model, (x, y), "mse", **kwargs)
