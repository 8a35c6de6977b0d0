"""Steps whose kind is chosen on the host, and late-phase SAM (`sam_start_epoch`).

A schedule known before the step (`sam_every`, LookSAM's refreshes,
`sam_start_epoch`) runs as one compiled function per kind of step: the tests
check that those functions hold no conditional, that the host's step count
continues across `BackupAndRestore`, a second `fit` and `initial_epoch`
exactly, and that late-phase SAM equals plain Keras followed by the wrapper
with the same optimizer, exactly. (The same on JAX and PyTorch, jit on and
off, JAX DataParallel: tests/support/backend_check.py.)
"""

import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from interrupts import Interrupt
from interrupts import InterruptAt
from paths import DATA
from strategies import mirrored
from wrappers import wrap

import keras_sam
from keras_sam.models import host_steps

D, BATCH, STEPS = 5, 8, 6


def own_state(model):
    """The wrapper's named state variables, in the order they were made."""
    return keras.tree.flatten(list(model.state_variables().values()))


def make_inner(seed=0, bn=True):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((D,)), keras.layers.Dense(6, activation="tanh")]
    if bn:
        layers.append(keras.layers.BatchNormalization(momentum=0.8))
    return keras.Sequential(layers + [keras.layers.Dense(2)])


def make_data(steps=STEPS, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(steps * BATCH, D)).astype("float32")
    y = rng.normal(size=(steps * BATCH, 2)).astype("float32")
    return x, y


def optimizer():
    return keras.optimizers.SGD(0.05, momentum=0.9)


def compiled(model, opt=None, **kwargs):
    model.compile(optimizer=opt or optimizer(), loss="mse", **kwargs)
    return model


def fit(model, data, epochs, **kwargs):
    x, y = data
    kwargs.setdefault("verbose", 0)
    return model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, **kwargs)


def state(model, opt):
    """Weights (BatchNorm statistics included) and optimizer state."""
    return [v.numpy() for v in model.weights] + [v.numpy() for v in opt.variables]


def assert_equal_states(a, b):
    assert len(a) == len(b)
    for i, (p, q) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(p, q, err_msg=f"variable {i}")


SCHEDULED = ["sam", "gsam", "looksam", "aesam"]


# ------------------------------------------------------- no conditional
def conditionals(model, kind):
    """Conditional ops in `train_step` traced for one kind of step (every
    graph function included)."""
    model._chooser.clock.kind = kind
    step = tf.function(lambda x, y: model.train_step((x, y)))
    graph = step.get_concrete_function(
        tf.TensorSpec((BATCH, D)), tf.TensorSpec((BATCH, 2))
    ).graph.as_graph_def()
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    return sum(n.op in ("If", "StatelessIf", "Case", "StatelessCase") for n in nodes)


@pytest.mark.parametrize("name", ["sam", "gsam", "looksam"])
def test_host_chosen_steps_hold_no_conditional(name):
    model = compiled(wrap(name, make_inner(), sam_every=3))
    fit(model, make_data(), 1)
    assert isinstance(model.train_function, host_steps.HostChosenSteps)
    assert model.train_function.kinds_built() == [host_steps.BETWEEN, host_steps.SAM]
    for kind in (host_steps.SAM, host_steps.BETWEEN):
        assert conditionals(model, kind) == 0, kind
    assert conditionals(model, host_steps.IN_STEP) > 0  # what the count finds


def test_sam_every_one_and_data_driven_policies_build_one_function():
    for model in (
        compiled(keras_sam.SAMModel(make_inner(), rho=0.1)),
        compiled(keras_sam.AESAMModel(make_inner(), rho=0.1)),
    ):
        fit(model, make_data(2), 1)
        assert not isinstance(model.train_function, host_steps.HostChosenSteps)


# ---------------------------------------------------------- late phase
@pytest.mark.parametrize("epochs", [1, 2])
def test_a_fit_that_ends_before_sam_start_epoch_warns_and_trains_plain(epochs):
    data = make_data()
    model = compiled(keras_sam.SAMModel(make_inner(), rho=0.1, sam_start_epoch=2))
    expected = (
        r"SAMModel\(sam_start_epoch=2\) takes its first SAM step in epoch 2 \(0-based\), "
        rf"but this `fit\(epochs={epochs}\)` ends before it: every step of this fit is a "
        "plain step"
    )
    with pytest.warns(UserWarning, match=expected):
        history = fit(model, data, epochs)
    assert history.history["sam_fraction"] == [0.0] * epochs
    reference = compiled(make_inner())  # plain Keras, the same start
    fit(reference, data, epochs)
    assert_equal_states(state(model.inner, model.optimizer), state(reference, reference.optimizer))


def test_a_fit_that_reaches_sam_start_epoch_does_not_warn():
    model = compiled(keras_sam.SAMModel(make_inner(), rho=0.1, sam_start_epoch=2))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*sam_start_epoch")
        history = fit(model, make_data(), 3)
    assert history.history["sam_fraction"] == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("name", SCHEDULED)
@pytest.mark.parametrize("every", [1, 2])
def test_late_phase_is_plain_keras_then_the_wrapper_exactly(name, every):
    if name == "aesam" and every > 1:
        pytest.skip("AE-SAM decides from the data (no sam_every)")
    data = make_data()
    extra = {} if name == "aesam" else {"sam_every": every}
    model = compiled(wrap(name, make_inner(), sam_start_epoch=2, **extra))
    history = fit(model, data, 4)

    reference = make_inner()
    shared = optimizer()
    compiled(reference, shared)
    fit(reference, data, 2)
    wrapped = compiled(wrap(name, reference, **extra), shared)
    fit(wrapped, data, 4, initial_epoch=2)
    assert_equal_states(state(model, model.optimizer), state(wrapped, shared))
    fraction = history.history["sam_fraction"]
    assert fraction[:2] == [0.0, 0.0]
    grad_norm = history.history["grad_norm"]
    assert np.isnan(grad_norm[:2]).all() and np.isfinite(grad_norm[2:]).all()  # not measured
    assert model._chooser.kind is host_steps.IN_STEP  # a train_step called by hand
    if name != "aesam":
        expected = [len(range(e * STEPS, (e + 1) * STEPS, every)) / STEPS for e in (2, 3)]
        np.testing.assert_allclose(fraction[2:], expected, rtol=1e-6)
        assert history.history["sharpness"][:2] == [0.0, 0.0]  # SAM steps only
        assert min(history.history["rho"][2:]) > 0


def test_late_phase_steps_per_execution_equals_one_step_per_call():
    data = make_data()
    a = compiled(keras_sam.SAMModel(make_inner(), rho=0.1, sam_start_epoch=1))
    fit(a, data, 3)
    b = compiled(
        keras_sam.SAMModel(make_inner(), rho=0.1, sam_start_epoch=1), steps_per_execution=4
    )
    fit(b, data, 3)
    # Every call lies in one epoch: no conditional is needed.
    assert b.train_function.kinds_built() == [host_steps.PLAIN, host_steps.SAM]
    for p, q in zip(a.weights, b.weights):
        np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=1e-6, atol=1e-7, err_msg=p.path)


def test_sam_every_with_several_steps_per_call_decides_inside_exactly():
    data = make_data()
    a = compiled(keras_sam.SAMModel(make_inner(), rho=0.1, sam_every=3, sam_start_epoch=1))
    ha = fit(a, data, 3)
    b = compiled(
        keras_sam.SAMModel(make_inner(), rho=0.1, sam_every=3, sam_start_epoch=1),
        steps_per_execution=4,
    )
    hb = fit(b, data, 3)
    assert b.train_function.kinds_built() == [host_steps.IN_STEP, host_steps.PLAIN]
    for p, q in zip(a.weights, b.weights):
        np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=1e-6, atol=1e-7, err_msg=p.path)
    np.testing.assert_allclose(ha.history["sam_fraction"], hb.history["sam_fraction"])


# ------------------------------------------- the host's count continues
RESUMED = {
    "every": lambda m: keras_sam.GSAMModel(m, rho=0.1, sam_every=4, sam_start_epoch=1),
    "looksam": lambda m: keras_sam.LookSAMModel(m, rho=0.1, sam_every=4, sam_start_epoch=1),
}


@pytest.mark.parametrize("name", list(RESUMED))
def test_backup_and_restore_continues_the_schedule_exactly(tmp_path, name):
    data = make_data(steps=5)  # 5 steps an epoch: the refreshes move across epochs
    whole = compiled(RESUMED[name](make_inner()))
    fit(whole, data, 4)

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    run = compiled(RESUMED[name](make_inner()))
    with pytest.raises(Interrupt):
        fit(run, data, 4, callbacks=[backup, InterruptAt(3)])
    resumed = compiled(RESUMED[name](make_inner(seed=5)))  # all restored
    history = fit(resumed, data, 4, callbacks=[backup])
    assert len(history.history["loss"]) == 1  # epoch 3 only
    assert_equal_states(state(resumed, resumed.optimizer), state(whole, whole.optimizer))


@pytest.mark.parametrize("name", list(RESUMED))
def test_second_fit_with_initial_epoch_continues_exactly(name):
    data = make_data(steps=5)
    whole = compiled(RESUMED[name](make_inner()))
    fit(whole, data, 4)
    parts = compiled(RESUMED[name](make_inner()))
    fit(parts, data, 2)
    fit(parts, data, 4, initial_epoch=2)
    assert_equal_states(state(parts, parts.optimizer), state(whole, whole.optimizer))


def test_train_on_batch_follows_the_optimizer_step_count():
    x, y = make_data(steps=5)
    a = compiled(keras_sam.SAMModel(make_inner(), rho=0.1, sam_every=2))
    fit(a, (x, y), 1)
    b = compiled(keras_sam.SAMModel(make_inner(), rho=0.1, sam_every=2))
    for s in range(0, len(x), BATCH):
        b.train_on_batch(x[s : s + BATCH], y[s : s + BATCH])
    assert_equal_states(state(a, a.optimizer), state(b, b.optimizer))


def test_a_callback_list_gets_the_clock_for_the_fit_only():
    data = make_data()
    a = compiled(keras_sam.SAMModel(make_inner(), rho=0.1, sam_every=3))
    fit(a, data, 2)
    b = compiled(keras_sam.SAMModel(make_inner(), rho=0.1, sam_every=3))
    callbacks = keras.callbacks.CallbackList([keras.callbacks.History()], model=b)
    fit(b, data, 2, callbacks=callbacks)
    assert b._chooser.clock not in callbacks.callbacks
    assert_equal_states(state(a, a.optimizer), state(b, b.optimizer))


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_a_loss_scale_optimizer_keeps_sam_every_inside_the_step(mixed_float16):
    """Its skipped steps leave `optimizer.iterations` behind a host count, so
    `sam_every` chooses inside the step; the late phase stays on the host,
    with the engine's plain step (a skipped step changes no state)."""
    data = make_data()
    every = compiled(keras_sam.SAMModel(make_inner(), rho=0.1, sam_every=2))
    history = fit(every, data, 1)
    assert isinstance(every.optimizer, keras.optimizers.LossScaleOptimizer)
    assert not isinstance(every.train_function, host_steps.HostChosenSteps)
    np.testing.assert_allclose(history.history["sam_fraction"], [0.5])
    late = compiled(keras_sam.SAMModel(make_inner(), rho=0.1, sam_every=2, sam_start_epoch=1))
    history = fit(late, data, 2)
    assert late.train_function.kinds_built() == [host_steps.IN_STEP, host_steps.PLAIN]
    np.testing.assert_allclose(history.history["sam_fraction"], [0.0, 0.5])
    assert np.isfinite(history.history["grad_norm"]).all()  # the engine's step measures it


def test_a_single_callback_outside_a_list():
    model = compiled(keras_sam.SAMModel(make_inner(), rho=0.1, sam_every=2))
    history = keras.callbacks.History()
    fit(model, make_data(), 2, callbacks=history)
    assert len(history.history["loss"]) == 2


# ------------------------------------------------ the batch ramp, saving
def test_late_phase_with_the_batch_ramp_and_an_epoch_axis_rate():
    x, y = make_data(steps=8)
    sizes = {0: 4, 1: 8, 2: 16}

    def dataset_fn(batch):
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)

    def run(model, epochs, initial_epoch=0, opt=None):
        scheduler = keras_sam.callbacks.BatchSizeScheduler(sizes, dataset_fn)
        if opt is None:
            lr = keras_sam.schedules.CosineAnnealing(
                0.1, 0.01, epochs=3, steps_per_epoch=scheduler.steps_per_epoch(3)
            )
            opt = keras.optimizers.SGD(lr, momentum=0.9)
        compiled(model, opt)
        history = model.fit(
            dataset_fn(4),
            epochs=epochs,
            initial_epoch=initial_epoch,
            callbacks=[scheduler],
            verbose=0,
        )
        return history, opt

    model = keras_sam.SAMModel(make_inner(), rho=0.1, sam_every=2, sam_start_epoch=1)
    history, opt = run(model, 3)
    assert history.history["batch_size"] == [4, 8, 16]
    np.testing.assert_allclose(history.history["sam_fraction"], [0.0, 0.5, 0.5])

    reference = make_inner()
    _, shared = run(reference, 1)
    run(keras_sam.SAMModel(reference, rho=0.1, sam_every=2), 3, initial_epoch=1, opt=shared)
    assert_equal_states(state(model, opt), state(reference, shared))


def test_sam_start_epoch_is_saved_and_loaded(tmp_path):
    model = compiled(keras_sam.GSAMModel(make_inner(), rho=0.1, sam_every=2, sam_start_epoch=3))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.sam_start_epoch == 3 and loaded.sam_every == 2
    assert loaded.get_config()["sam_start_epoch"] == 3


# ------------------------------------------------------------- replicas
def test_replicas_take_the_host_chosen_steps_alike():
    """With the all-reduced perturbation and no BatchNorm, 2 replicas give
    the one-device weights."""
    data = make_data()

    def run(strategy):
        with strategy.scope():
            model = keras_sam.SAMModel(
                make_inner(bn=False),
                rho=0.1,
                sam_every=2,
                sam_start_epoch=1,
                sync_perturbation=True,
            )
            compiled(model)
        fit(model, data, 3)
        return model

    single, multi = run(tf.distribute.get_strategy()), run(mirrored(2))
    for p, q in zip(single.weights, multi.weights):
        np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=1e-5, atol=1e-6, err_msg=p.path)


# --------------------------------------------------------------- errors
@pytest.mark.parametrize("value", [-1, 1.5, "2", True])
def test_bad_sam_start_epoch_is_refused(value):
    with pytest.raises((ValueError, TypeError), match="sam_start_epoch"):
        keras_sam.SAMModel(make_inner(), sam_start_epoch=value)


@pytest.mark.parametrize("cls", [keras_sam.MSAMModel, keras_sam.MESAModel])
def test_one_gradient_methods_refuse_sam_start_epoch(cls):
    with pytest.raises(ValueError, match="sam_start_epoch"):
        cls(make_inner(), sam_start_epoch=2)


# -------------------------------------------------- files saved by 0.3

SAVED_0_3 = {
    # name: (class, settings saved by keras_sam 0.3)
    "sam": (keras_sam.SAMModel, dict(rho=0.07, adaptive=True, eta=0.02, sam_every=3)),
    "gsam": (keras_sam.GSAMModel, dict(rho=0.06, alpha=0.3, rho_min=0.01, lr_max=0.1)),
    "looksam": (keras_sam.LookSAMModel, dict(rho=0.05, sam_every=2, alpha=0.4)),
}


@pytest.mark.parametrize("name", list(SAVED_0_3))
def test_a_model_saved_by_0_3_loads_and_trains_on(name):
    """tests/support/data/<name>_0_3.keras: trained 2 epochs and saved by keras_sam
    0.3 with Keras 3.15.1 (SGD momentum, BatchNorm), with its predictions
    beside it."""
    if tuple(int(p) for p in keras.__version__.split(".")[:2]) < (3, 15):
        pytest.skip(
            "the files were saved with Keras 3.15.1, whose layer configs Keras < 3.15 reads not"
        )
    cls, settings = SAVED_0_3[name]
    loaded = keras.models.load_model(os.path.join(DATA, f"{name}_0_3.keras"))
    assert type(loaded) is cls
    config = loaded.get_config()
    assert {k: config[k] for k in settings} == settings
    assert config["sam_start_epoch"] == 0
    data = np.load(os.path.join(DATA, "data_0_3.npz"))
    x, y = data["x"], data["y"]
    expected = np.load(os.path.join(DATA, f"{name}_0_3_predict.npy"))
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)
    assert int(loaded.optimizer.iterations.numpy()) == 4  # 2 epochs of 2 steps
    if name == "looksam":  # the stored direction came back
        assert any(np.any(v.numpy() != 0) for v in own_state(loaded))
    before = [v.numpy() for v in loaded.inner.trainable_variables]
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert int(loaded.optimizer.iterations.numpy()) == 6
    assert any(np.any(a != b.numpy()) for a, b in zip(before, loaded.inner.trainable_variables))


@pytest.mark.parametrize("name", ["looksam_noise", "aesam_noise"])
def test_a_model_saved_by_0_4_with_state_and_noise_scale_loads_its_state(name):
    """tests/support/data/<name>_0_4.keras: LookSAM / AE-SAM with `noise_scale=True`,
    trained 2 epochs and saved by keras_sam 0.4 (Keras 3.15.1), which held a
    method's state and the noise scale's averages in one order; both come
    back bitwise, beside the predictions."""
    if tuple(int(p) for p in keras.__version__.split(".")[:2]) < (3, 15):
        pytest.skip("the files were saved with Keras 3.15.1")
    loaded = keras.models.load_model(os.path.join(DATA, f"{name}_0_4.keras"))
    saved = np.load(os.path.join(DATA, f"{name}_0_4_state.npz"))
    state = own_state(loaded)
    assert len(state) == len([k for k in saved.files if k.startswith("own_")])
    for i, v in enumerate(state):
        np.testing.assert_array_equal(v.numpy(), saved[f"own_{i}"])
    np.testing.assert_array_equal(loaded._noise.average.numpy(), saved["noise"])
    data = np.load(os.path.join(DATA, "data_0_3.npz"))
    np.testing.assert_array_equal(loaded.predict(data["x"], verbose=0), saved["predict"])
