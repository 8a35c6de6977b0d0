"""Tests of the measure registry of keras_sam.sharpness, of SharpnessMonitor
logging a registered measure, and of the one read of the model's variables
per measure call."""

import keras
import numpy as np
import pytest

from keras_sam import sharpness
from keras_sam.callbacks.sharpness_monitor import SharpnessMonitor
from keras_sam.sharpness import _objective

N, BATCH = 100, 32  # four batches (32, 32, 32, 4)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, 3)).astype("float32")
    y = rng.standard_normal((N, 1)).astype("float32")
    return x, y


def _model(seed=1):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)]
    )
    return model


@pytest.fixture
def registry():
    """Unregisters whatever a test registered."""
    before = sharpness.measure_names()
    yield
    for name in sharpness.measure_names():
        if name not in before:
            sharpness.unregister_measure(name)
    assert sharpness.measure_names() == before


def test_builtin_measures_are_registered_in_order():
    assert sharpness.MEASURES == (
        "worst_case_sharpness",
        "full_gradient_norm",
        "hessian_max_eigenvalue",
    )
    assert sharpness.measure_names()[:3] == sharpness.MEASURES
    for name in sharpness.MEASURES:
        assert callable(sharpness.get_measure(name))
    with pytest.raises(ValueError, match="^`name` must be one of"):
        sharpness.get_measure("flatness")


def test_builtin_measures_follow_the_calling_convention():
    x, y = _data()
    model = _model()
    batches = sharpness.Batches((x, y), batch_size=BATCH)
    settings = dict(
        rho=0.05,
        adaptive=True,
        iterations=3,
        hessian_iterations=4,
        hessian_tol=1e-6,
        seed=2,
        include_model_losses=False,
    )
    assert set(settings) == set(sharpness.MEASURE_SETTINGS)
    expected = {
        "worst_case_sharpness": sharpness.worst_case_sharpness(
            model, (x, y), "mse", rho=0.05, adaptive=True, iterations=3, batch_size=BATCH
        ),
        "full_gradient_norm": sharpness.full_gradient_norm(model, (x, y), "mse", batch_size=BATCH),
        "hessian_max_eigenvalue": sharpness.hessian_max_eigenvalue(
            model, (x, y), "mse", iterations=4, tol=1e-6, seed=2, batch_size=BATCH
        ),
    }
    for name, value in expected.items():
        got = sharpness.get_measure(name)(model, batches, "mse", **settings)
        assert got == value


def test_register_and_unregister_check_their_arguments(registry):
    def measure(model, data, loss, **settings):
        return 0.0

    for bad in ("", None, 3):
        with pytest.raises(ValueError, match="^`name` must be"):
            sharpness.register_measure(bad, measure)
    with pytest.raises(ValueError, match="^`fn` must be"):
        sharpness.register_measure("mine", "not callable")
    for name in sharpness.MEASURES:  # built-in: neither replaced nor removed
        with pytest.raises(ValueError, match="^`name` must be"):
            sharpness.register_measure(name, measure)
        with pytest.raises(ValueError, match="^`name` must be"):
            sharpness.unregister_measure(name)
    with pytest.raises(ValueError, match="^`name` must be"):
        sharpness.unregister_measure("mine")

    assert sharpness.register_measure("mine", measure) is measure
    assert sharpness.measure_names() == sharpness.MEASURES + ("mine",)
    assert sharpness.get_measure("mine") is measure
    with pytest.raises(ValueError, match="^`name` must be"):
        sharpness.register_measure("mine", measure)
    assert sharpness.unregister_measure("mine") is measure
    assert sharpness.measure_names() == sharpness.MEASURES
    with pytest.raises(ValueError, match="measures"):
        SharpnessMonitor(_data(), measures="mine")


def test_sharpness_monitor_logs_a_registered_measure(registry):
    x, y = _data()
    model = _model()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    calls = []

    def weight_norm(model, data, loss, **settings):
        batches = list(data)
        calls.append((loss, settings, batches))
        return np.float32(
            np.sqrt(
                sum(
                    np.sum(np.square(keras.ops.convert_to_numpy(v)))
                    for v in model.trainable_variables
                )
            )
        )

    sharpness.register_measure("weight_norm", weight_norm)
    monitor = SharpnessMonitor(
        (x, y),
        measures=("full_gradient_norm", "weight_norm"),
        every=2,
        rho=0.05,
        iterations=3,
        hessian_iterations=4,
        hessian_tol=1e-6,
        seed=5,
        batch_size=BATCH,
        steps=3,
        prefix="train_",
    )
    weights = []
    spy = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: weights.append(model.get_weights())
    )
    history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[monitor, spy])

    assert len(calls) == 1  # epoch 2 only
    loss, settings, batches = calls[0]
    assert loss == "mse"  # the model's compiled loss
    assert settings == dict(
        rho=0.05,
        adaptive=False,
        iterations=3,
        hessian_iterations=4,
        hessian_tol=1e-6,
        seed=5,
        include_model_losses=False,
    )
    assert len(batches) == 3  # `steps` applied; (x, y, sample_weight)
    assert [tuple(b[0].shape) for b in batches] == [(BATCH, 3)] * 3
    assert all(b[2] is None for b in batches)

    values = history.history["train_weight_norm"]
    assert len(values) == 1 and type(monitor.results[1]["train_weight_norm"]) is float
    expected = np.sqrt(sum(np.sum(np.square(w)) for w in weights[1]))
    np.testing.assert_allclose(values[0], expected, rtol=1e-6)
    assert len(history.history["train_full_gradient_norm"]) == 1


# ---------------------------------------------------------------------------
# The model's variables are read once per measure call.


@pytest.fixture
def read_counter(monkeypatch):
    counts = {"model": 0, "lists": 0}
    read_model_values = _objective.read_model_values
    read_values = _objective._read_values

    def counting_model(model):
        counts["model"] += 1
        return read_model_values(model)

    def counting_lists(variables):
        counts["lists"] += 1
        return read_values(variables)

    monkeypatch.setattr(_objective, "read_model_values", counting_model)
    monkeypatch.setattr(_objective, "_read_values", counting_lists)
    return counts


@pytest.mark.parametrize(
    "fn,kwargs",
    [
        (sharpness.worst_case_sharpness, dict(rho=0.05, iterations=4)),
        (sharpness.full_gradient_norm, {}),
        (sharpness.hessian_max_eigenvalue, dict(iterations=4, tol=0.0)),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_each_measure_call_reads_the_variables_once(fn, kwargs, read_counter):
    x, y = _data()
    model = _model()
    model.compile("sgd", "mse")
    for call in range(1, 3):  # uncached, then cached compiled functions
        fn(model, (x, y), "mse", batch_size=BATCH, **kwargs)  # 4 batches
        assert read_counter == {"model": call, "lists": 2 * call}


def test_sharpness_monitor_reads_the_variables_once_per_measure(read_counter):
    x, y = _data()
    model = _model()
    model.compile("sgd", "mse")
    monitor = SharpnessMonitor(
        (x, y), measures=sharpness.MEASURES, iterations=3, hessian_iterations=3, batch_size=BATCH
    )
    monitor.measure(model)
    assert read_counter == {"model": 3, "lists": 6}
