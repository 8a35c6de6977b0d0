"""`keras.optimizers.MultiOptimizer` (Keras 3.15+: one optimizer for the
backbone, another for the head) under every wrapper.

Oracles: plain Keras with the same MultiOptimizer (rho = 0); one SAM and
one GSAM step written by hand around the backend's own gradient, GSAM's
radius from the default optimizer's rate by its closed form; a head whose
optimizer has rate 0 stays bitwise (each variable went to its own
optimizer); exact error texts before the first step; the epoch-based rate
schedules of both sub-optimizers follow the batch sizes taken. JAX and
PyTorch: tests/cross_backend/test_multi_optimizer_backends.py.
"""

import keras
import numpy as np
import pytest
from backend_gradient import backend_gradient
from wrappers import wrap

import keras_sam
from keras_sam import _keras_compat

if _keras_compat.keras_version() < (3, 15):
    pytest.skip("keras.optimizers.MultiOptimizer is new in Keras 3.15", allow_module_level=True)

N, D, BATCH = 32, 5, 8


def numpy(t):
    return np.asarray(keras.ops.convert_to_numpy(t))


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype("float32")
    return x, np.tanh(x @ rng.normal(size=(D, 1))).astype("float32")


def inner(lora=False):
    """A backbone Dense and a head Dense, NumPy-drawn weights."""
    model = keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(6, activation="tanh", name="backbone"),
            keras.layers.Dense(1, name="head"),
        ]
    )
    if lora:
        model.get_layer("backbone").enable_lora(2)
    rng = np.random.default_rng(1)
    for v in model.weights:
        v.assign(rng.normal(scale=0.4, size=v.shape).astype(v.dtype))
    return model


def multi(head_rate=0.01, default=None):
    """SGD(0.1, momentum) by default, Adam for the head."""
    default = default or keras.optimizers.SGD(0.1, momentum=0.9)
    return keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(default, {".*head.*": keras.optimizers.Adam(head_rate)})
    )


def gradient(model, x, y):
    """The backend's own gradient of the MSE at the model's weights (NumPy)."""
    return backend_gradient(model, lambda t, p: keras.ops.mean(keras.ops.square(p - t)), x, y)


def norm(arrays):
    return np.sqrt(sum(float(np.sum(a * a)) for a in arrays))


def hand_written_direction(model, x, y, rho, alpha=None):
    """SAM's (alpha None) or GSAM's descent direction at the model's weights."""
    g = gradient(model, x, y)
    w = [numpy(v).astype(np.float64) for v in model.trainable_variables]
    for v, wi, gi in zip(model.trainable_variables, w, g):
        v.assign((wi + rho * gi / (norm(g) + 1e-12)).astype("float32"))
    gp = gradient(model, x, y)
    for v, wi in zip(model.trainable_variables, w):
        v.assign(wi.astype("float32"))
    if alpha is None:
        return gp
    coef = sum(float(np.sum(a * b)) for a, b in zip(g, gp)) / (norm(gp) ** 2 + 1e-12)
    return [p - alpha * (c - coef * p) for c, p in zip(g, gp)]


def assert_weights_equal(got, want, atol):
    for a, b in zip(got.trainable_variables, want.trainable_variables):
        np.testing.assert_allclose(numpy(a), numpy(b), rtol=0, atol=atol, err_msg=b.path)


# ------------------------------------------------------------ the oracles
@pytest.mark.parametrize(
    "wrap",
    [
        lambda m: keras_sam.SAMModel(m, rho=0.0),
        lambda m: keras_sam.GSAMModel(m, rho=0.0, alpha=0.3),
        lambda m: keras_sam.RWPModel(m, rho=0.0, seed=1),
    ],
    ids=["sam", "gsam", "rwp"],
)
def test_rho_zero_equals_plain_keras_with_the_same_multi_optimizer(wrap):
    x, y = data()
    plain = inner()
    plain.compile(optimizer=multi(), loss="mse")
    plain.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    model = wrap(inner())
    model.compile(optimizer=multi(), loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    assert_weights_equal(model, plain, atol=1e-6)


@pytest.mark.parametrize("method", ["sam", "gsam"])
def test_two_steps_equal_hand_written_steps(method):
    """GSAM with `rho_min`: the radius follows the DEFAULT optimizer's rate,
    rho_t = rho_min + (rho - rho_min) (lr - lr_min) / (lr_max - lr_min)."""
    x, y = data()
    rho, alpha = 0.2, 0.3
    if method == "gsam":
        rho_t = 0.02 + (rho - 0.02) * (0.1 - 0.0) / (0.4 - 0.0)  # default SGD(0.1)
        model = keras_sam.GSAMModel(
            inner(), rho=rho, alpha=alpha, rho_min=0.02, lr_max=0.4, lr_min=0.0
        )
    else:
        rho_t, alpha = rho, None
        model = keras_sam.SAMModel(inner(), rho=rho)
    model.compile(optimizer=multi(), loss="mse")
    model.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, epochs=2, shuffle=False, verbose=0)

    reference, optimizer = inner(), multi()
    for _ in range(2):
        direction = hand_written_direction(reference, x[:BATCH], y[:BATCH], rho_t, alpha)
        direction = [keras.ops.convert_to_tensor(d.astype("float32")) for d in direction]
        optimizer.apply(direction, reference.trainable_variables)
    assert_weights_equal(model, reference, atol=1e-6)
    if method == "gsam":
        assert float(numpy(model.get_metrics_result()["rho"])) == pytest.approx(rho_t, rel=1e-6)


CASES = {
    # test id: (method, settings over tests/support/wrappers.py's)
    "sam": ("sam", {}),
    "sam_every2": ("sam", dict(sam_every=2)),
    "sam_start_epoch": ("sam", dict(sam_start_epoch=1)),
    "asam": ("asam", {}),
    "tf_keras_sam": ("tf_keras_sam", {}),
    "gsam": ("gsam", {}),
    "gsam_rho_min": ("gsam", dict(rho_min=0.01)),
    "looksam": ("looksam", {}),
    "aesam": ("aesam", {}),
    "mesa": ("mesa", dict(from_logits=True)),
    "rwp": ("rwp", {}),
    "flat_lora": ("flat_lora", {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_wrapper_sends_each_variable_to_its_optimizer(name):
    """The head's optimizer has rate 0: the head stays bitwise, the
    backbone (SGD) moves."""
    x, y = data()
    network = inner(lora=name == "flat_lora")
    method, settings = CASES[name]
    model = wrap(method, network, **settings)
    model.compile(optimizer=multi(head_rate=0.0), loss="mse")
    head = [numpy(v).copy() for v in network.get_layer("head").weights]
    backbone = [numpy(v).copy() for v in network.get_layer("backbone").trainable_weights]
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    for v, before in zip(network.get_layer("head").weights, head):
        np.testing.assert_array_equal(numpy(v), before, err_msg=v.path)
    moved = network.get_layer("backbone").trainable_weights
    assert all(np.any(numpy(v) != b) for v, b in zip(moved, backbone))


def test_momentum_sam_refuses_it_before_the_first_step():
    x, y = data()
    model = keras_sam.MSAMModel(inner(), rho=0.05)
    model.compile(optimizer=multi(), loss="mse")
    before = [numpy(v).copy() for v in model.weights]
    with pytest.raises(ValueError, match="MultiOptimizer is not supported"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    for v, b in zip(model.weights, before):
        np.testing.assert_array_equal(numpy(v), b)


def test_gsam_rho_min_refuses_a_multi_optimizer_without_default():
    x, y = data()
    adam, sgd = keras.optimizers.Adam(0.01), keras.optimizers.SGD(0.1)
    selector = keras.optimizers.MultiOptimizer(lambda v: adam if "head" in v.path else sgd)
    model = keras_sam.GSAMModel(inner(), rho=0.05, rho_min=0.01)
    model.compile(optimizer=selector, loss="mse")
    before = [numpy(v).copy() for v in model.weights]
    with pytest.raises(ValueError, match=r"built from a callable.*OptimizerMap\(default_optimizer"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    for v, b in zip(model.weights, before):
        np.testing.assert_array_equal(numpy(v), b)


def test_epoch_rate_schedules_of_every_sub_optimizer_follow_the_batch_sizes():
    tf = pytest.importorskip("tensorflow")
    epochs = 6

    def dataset_fn(batch_size):
        x, y = data()
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size, drop_remainder=True)

    policy = keras_sam.callbacks.BatchSizeOnPlateau(
        4, patience=0, min_delta=10.0, max_batch_size=16
    )  # never improves on the first epoch: grows after every later one
    scheduler = keras_sam.callbacks.BatchSizeScheduler(policy, dataset_fn)
    steps = scheduler.steps_per_epoch(epochs)
    rates = [
        keras_sam.schedules.CosineAnnealing(top, top / 10, epochs, steps) for top in (0.1, 0.01)
    ]
    optimizer = keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(
            keras.optimizers.SGD(rates[0]), {".*head.*": keras.optimizers.Adam(rates[1])}
        )
    )
    model = keras_sam.SAMModel(inner(), rho=0.05)
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(dataset_fn(4), epochs=epochs, callbacks=[scheduler], verbose=0).history
    taken = [N // b for b in history["batch_size"]]
    assert history["batch_size"] == [4, 4, 8, 16, 16, 16]
    for rate in rates:
        assert rate.epoch_steps == taken
