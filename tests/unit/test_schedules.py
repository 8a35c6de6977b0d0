"""Tests for keras_sam.schedules against float64 references written here.

The references map a step to its fractional epoch by walking through the
epochs one by one (not the comparison-and-sum of the module), then apply the
closed forms of the paper's schedules with `math`.
"""

import inspect
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_sam import schedules
from keras_sam.schedules import Constant
from keras_sam.schedules import CosineAnnealing
from keras_sam.schedules import ExponentialDecay
from keras_sam.schedules import LinearDecay
from keras_sam.schedules import PolynomialDecay

PAPER_BATCHES = {0: 16, 40: 32, 80: 64, 120: 128, 160: 256}
RTOL = 1e-6


# --------------------------------------------------------------------------
# Independent float64 references.


def ref_epoch(step, steps_list):
    """Fractional epoch of `step`: walk the epochs, the last length repeating."""
    epoch, start = 0, 0
    while True:
        n = steps_list[min(epoch, len(steps_list) - 1)]
        if step < start + n:
            return epoch + (step - start) / n
        start += n
        epoch += 1


def ref_closed_form(kind, epoch, initial, final, epochs, warmup=0, power=1.0):
    """Learning rate at a (fractional) epoch, float64."""
    if warmup > 0 and epoch < warmup:
        return initial * epoch / warmup
    p = min(max((epoch - warmup) / (epochs - warmup), 0.0), 1.0)
    if kind == "cosine":
        return final + (initial - final) * (1 + math.cos(math.pi * p)) / 2
    if kind == "linear":
        return initial + (final - initial) * p
    if kind == "polynomial":
        return final + (initial - final) * (1 - p) ** power
    if kind == "exponential":
        return initial * (final / initial) ** p
    if kind == "constant":
        return initial
    raise AssertionError(kind)


def make(kind, initial, final, epochs, steps, warmup=0, power=2.5):
    """The schedule under test for `kind`, and its float64 reference step -> lr."""
    if kind == "cosine":
        sched = CosineAnnealing(initial, final, epochs, steps, warmup_epochs=warmup)
    elif kind == "linear":
        sched = LinearDecay(initial, final, epochs, steps, warmup_epochs=warmup)
    elif kind == "polynomial":
        sched = PolynomialDecay(initial, final, epochs, steps, warmup_epochs=warmup, power=power)
    elif kind == "exponential":
        sched = ExponentialDecay(initial, final, epochs, steps, warmup_epochs=warmup)
    else:
        sched = Constant(initial, epochs, steps, warmup_epochs=warmup)
        final = initial
    steps_list = [steps] if isinstance(steps, int) else list(steps)

    def ref(step):
        return ref_closed_form(
            kind, ref_epoch(step, steps_list), initial, final, epochs, warmup, power
        )

    return sched, ref


def assert_close(actual, expected, scale):
    # rtol 1e-6 on the rate; the atol (1e-7 of the schedule's largest rate) only
    # matters where the rate itself approaches 0 and float32 has no digits left.
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=1e-7 * scale)


ALL_CLASSES = [CosineAnnealing, LinearDecay, PolynomialDecay, ExponentialDecay, Constant]
KINDS = ["cosine", "linear", "polynomial", "exponential", "constant"]
# (steps_per_epoch, warmup_epochs) for 8 epochs.
STEP_CASES = [
    ([7, 3, 5, 2], 0),  # shorter than epochs: the last entry (2) repeats
    ([7, 3, 5, 2, 11, 4, 1, 9], 1.5),
    ((6, 6, 1, 13, 2, 8, 5, 3, 4, 4), 0.5),  # longer than epochs; a tuple
    (5, 2),
]


# --------------------------------------------------------------------------
# Values at every step.


@pytest.mark.parametrize("steps,warmup", STEP_CASES, ids=lambda s: str(s)[:12])
@pytest.mark.parametrize("kind", KINDS)
def test_every_step_matches_reference_eager_and_tf_function(kind, steps, warmup):
    epochs, initial, final = 8, 0.1, 0.002
    sched, ref = make(kind, initial, final, epochs, steps, warmup)
    steps_list = [steps] if isinstance(steps, int) else list(steps)
    total = sum(steps_list[min(e, len(steps_list) - 1)] for e in range(epochs))
    all_steps = range(total + 6)  # a few past the end: the clamp
    expected = np.array([ref(s) for s in all_steps])

    # As the optimizer calls it: an int64 variable read inside a tf.function.
    iterations = tf.Variable(0, dtype=tf.int64)

    @tf.function
    def graph_fn():
        return sched(iterations)

    traced = []
    for s in all_steps:
        iterations.assign(s)
        traced.append(float(graph_fn()))
    traced = np.array(traced)
    assert_close(traced, expected, initial)

    # Eagerly: one call over all steps at once.
    assert_close(np.asarray(sched(np.arange(len(expected)))), expected, initial)

    # At the first step of each epoch (eager scalar calls): the closed form at
    # the integer epoch, whatever the epoch lengths before it.
    start = 0
    for e in range(epochs + 1):
        f = ref_closed_form(
            kind,
            e,
            initial,
            initial if kind == "constant" else final,
            epochs,
            warmup,
            2.5,
        )
        assert_close(float(sched(start)), f, initial)
        assert_close(traced[start], f, initial)
        start += steps_list[min(e, len(steps_list) - 1)]


def test_xla_compiled_matches_eager():
    sched, ref = make("cosine", 0.1, 0.0, 6, [7, 3, 5, 2, 11, 4], warmup=0.5)

    @tf.function(jit_compile=True)
    def compiled(step):
        return sched(step)

    values = [float(compiled(tf.constant(s, tf.int64))) for s in range(0, 40, 3)]
    assert_close(values, [ref(s) for s in range(0, 40, 3)], 0.1)


def test_fractional_epoch_is_exact_at_epoch_starts_and_extrapolates():
    sched = CosineAnnealing(0.1, 0.0, 10, [4, 2, 8])
    steps = np.arange(60)
    expected = [ref_epoch(s, [4, 2, 8]) for s in steps]
    np.testing.assert_allclose(np.asarray(sched.fractional_epoch(steps)), expected, rtol=1e-7)
    assert float(sched.fractional_epoch(4)) == 1.0
    assert float(sched.fractional_epoch(6)) == 2.0
    assert float(sched.fractional_epoch(14 + 8 * 5)) == 8.0  # repeated last entry


def test_paper_batch_schedule_every_epoch_start_and_end():
    steps = schedules.steps_per_epoch(50000, PAPER_BATCHES, 200)
    starts = np.concatenate([[0], np.cumsum(steps)])
    for kind in ["cosine", "linear", "polynomial", "exponential"]:
        sched, _ = make(kind, 0.1, 0.001, 200, steps)
        values = np.asarray(sched(starts))
        expected = [ref_closed_form(kind, e, 0.1, 0.001, 200, 0, 2.5) for e in range(201)]
        assert_close(values, expected, 0.1)
        assert_close(values[-1], 0.001, 0.1)  # lands on final after the last step
    # Inside epochs too, at a sample of steps (float32 over 242k steps).
    sched, ref = make("cosine", 0.1, 0.001, 200, steps)
    sample = np.arange(0, starts[-1], 997)
    assert_close(np.asarray(sched(sample)), [ref(s) for s in sample], 0.1)


def test_keras_step_based_cosine_misses_final_when_batch_grows():
    """Keras' CosineDecay sized from the first batch size is off once the batch
    grows; the epoch-based schedule ends exactly on final."""
    initial, final, epochs, n = 0.1, 0.001, 12, 1024
    batches = {0: 32, 4: 64, 8: 128}
    steps = schedules.steps_per_epoch(n, batches, epochs)
    assert steps == [32] * 4 + [16] * 4 + [8] * 4
    total = sum(steps)
    keras_cosine = keras.optimizers.schedules.CosineDecay(
        initial, decay_steps=(n // batches[0]) * epochs, alpha=final / initial
    )
    ours = CosineAnnealing(initial, final, epochs, steps)

    assert_close(float(ours(total)), final, initial)
    keras_end = float(keras_cosine(total))
    assert keras_end - final > 0.25 * (initial - final)  # far from final

    # While the first batch size holds the two agree; after it Keras decays
    # too slowly and stays above the closed form at every epoch start.
    starts = np.concatenate([[0], np.cumsum(steps)])
    gaps = []
    for e in range(epochs + 1):
        closed = ref_closed_form("cosine", e, initial, final, epochs)
        assert_close(float(ours(starts[e])), closed, initial)
        gaps.append(float(keras_cosine(starts[e])) - closed)
    np.testing.assert_allclose(gaps[:5], 0.0, atol=1e-7)
    assert min(gaps[5:]) > 0.005 * initial


def test_warmup_values():
    sched = LinearDecay(0.2, 0.0, 10, [4, 8, 2], warmup_epochs=2.5)
    # Step 0 is the first update: rate 0; then linear in the fractional epoch.
    assert float(sched(0)) == 0.0
    assert_close(float(sched(2)), 0.2 * 0.5 / 2.5, 0.2)  # epoch 0.5
    assert_close(float(sched(4)), 0.2 * 1.0 / 2.5, 0.2)  # epoch 1
    assert_close(float(sched(10)), 0.2 * 1.75 / 2.5, 0.2)  # epoch 1.75
    assert_close(float(sched(13)), 0.2, 0.2)  # epoch 2.5: the decay starts at initial
    assert_close(float(sched(14)), 0.2 * (1 - 0.5 / 7.5), 0.2)  # epoch 3
    warm = np.asarray(sched(np.arange(14)))
    assert np.all(np.diff(warm) > 0) and warm.max() <= 0.2 * (1 + 1e-6)


def test_constant_warmup_and_plain():
    assert float(Constant(0.05)(12345)) == pytest.approx(0.05, rel=1e-7)
    sched = Constant(0.1, steps_per_epoch=[10, 20], warmup_epochs=2)
    assert_close(
        np.asarray(sched([0, 5, 10, 20, 30, 31, 10**6])),
        [0.0, 0.025, 0.05, 0.075, 0.1, 0.1, 0.1],
        0.1,
    )
    assert sched.final_learning_rate == sched.initial_learning_rate == 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_clamped_at_final_after_epochs(kind):
    sched, _ = make(kind, 0.1, 0.004, 5, [3, 1, 4], warmup=1)
    final = 0.1 if kind == "constant" else 0.004
    total = 3 + 1 + 4 + 4 + 4
    after = np.asarray(sched(np.array([total, total + 1, total + 1000, 10**7])))
    assert_close(after, [final] * 4, 0.1)


def test_max_min_learning_rate_bound_the_schedule():
    cases = [
        (CosineAnnealing(0.1, 0.001, 5, 4, warmup_epochs=1), 0.1, 0.001),
        (LinearDecay(0.01, 0.1, 5, 4), 0.1, 0.01),  # increasing is allowed
        (PolynomialDecay(0.3, 0.0, 5, 4, power=3), 0.3, 0.0),
        (ExponentialDecay(0.1, 0.01, 5, 4), 0.1, 0.01),
        (Constant(0.1), 0.1, 0.1),
    ]
    for sched, hi, lo in cases:
        assert sched.max_learning_rate == hi and sched.min_learning_rate == lo
        assert isinstance(sched.initial_learning_rate, float)
        assert isinstance(sched.final_learning_rate, float)
        if sched.steps_per_epoch is not None:
            values = np.asarray(sched(np.arange(4 * sched.warmup_epochs, 30)))
            assert values.max() <= hi * (1 + 1e-6) and values.min() >= lo * (1 - 1e-6)


# --------------------------------------------------------------------------
# steps_per_epoch()


def test_steps_per_epoch_paper_doubling_schedule():
    dropped = schedules.steps_per_epoch(50000, PAPER_BATCHES, 200)
    kept = schedules.steps_per_epoch(50000, PAPER_BATCHES, 200, drop_remainder=False)
    assert dropped == [3125] * 40 + [1562] * 40 + [781] * 40 + [390] * 40 + [195] * 40
    assert kept == [3125] * 40 + [1563] * 40 + [782] * 40 + [391] * 40 + [196] * 40
    assert sum(dropped) == 242120
    assert all(type(s) is int for s in dropped + kept)


def test_steps_per_epoch_forms_agree():
    as_callable = schedules.steps_per_epoch(
        50000, lambda e: 16 * 2 ** (e // 40), 200, drop_remainder=False
    )
    as_dict = schedules.steps_per_epoch(50000, PAPER_BATCHES, 200, drop_remainder=False)
    assert as_callable == as_dict
    # Keys out of order and past `epochs` are fine.
    unsorted = {3: 50, 0: 10, 99: 1}
    assert schedules.steps_per_epoch(100, unsorted, 5) == [10, 10, 10, 2, 2]
    assert schedules.steps_per_epoch(100, 30, 3) == [3, 3, 3]
    assert schedules.steps_per_epoch(100, 30, 3, drop_remainder=False) == [4, 4, 4]


# --------------------------------------------------------------------------
# Inside a real optimizer.


def test_optimizer_evaluates_before_increment():
    """One `apply` per step, the rate read at the count before the increment."""
    sched, ref = make("cosine", 0.1, 0.0, 4, [3, 1, 2], warmup=0.5)
    var = keras.Variable(0.0)
    optimizer = keras.optimizers.SGD(learning_rate=sched)
    for k in range(12):
        assert int(optimizer.iterations) == k
        assert_close(float(optimizer.learning_rate), ref(k), 0.1)
        var.assign(0.0)
        optimizer.apply([keras.ops.ones(())], [var])
        assert_close(-float(var), ref(k), 0.1)  # the update used lr(step k)


def test_fit_with_growing_batch_tracks_reference():
    n = 40
    steps = schedules.steps_per_epoch(n, {0: 8, 2: 20}, 4)
    assert steps == [5, 5, 2, 2]
    sched, ref = make("cosine", 0.1, 0.0, 4, steps, warmup=1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=sched), loss="mse")
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            opt = self.model.optimizer
            seen.append((int(opt.iterations), float(opt.learning_rate)))

    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[Record()])
    model.fit(
        x,
        y,
        batch_size=20,
        epochs=4,
        initial_epoch=2,
        verbose=0,
        shuffle=False,
        callbacks=[Record()],
    )
    assert [it for it, _ in seen] == list(range(14))
    assert_close([lr for _, lr in seen], [ref(it) for it, _ in seen], 0.1)
    assert int(model.optimizer.iterations) == 14
    assert_close(float(model.optimizer.learning_rate), ref(14), 0.1)
    assert_close(float(model.optimizer.learning_rate), 0.0, 0.1)


# --------------------------------------------------------------------------
# Serialization.

ALL_SCHEDULES = [
    CosineAnnealing(0.1, 0.001, 200, [3125, 1562], warmup_epochs=2.5),
    LinearDecay(0.1, 0.0, 10, (4, 5, 6), warmup_epochs=1),
    PolynomialDecay(0.2, 0.01, 7, 13, power=0.5),
    ExponentialDecay(0.1, 1e-4, 3, [2, 2, 2, 2]),
    Constant(0.1),
    Constant(0.1, epochs=9, steps_per_epoch=[8, 4], warmup_epochs=0.5),
]


@pytest.mark.parametrize("sched", ALL_SCHEDULES, ids=repr)
def test_config_round_trip(sched):
    config = sched.get_config()
    json.dumps(config)  # plain Python values
    assert not isinstance(config["steps_per_epoch"], tuple)
    clone = type(sched).from_config(config)
    assert type(clone) is type(sched) and clone.get_config() == config
    probe = np.arange(0, 60, 7)
    np.testing.assert_array_equal(np.asarray(clone(probe)), np.asarray(sched(probe)))

    # Every constructor argument is in the config.
    params = set(inspect.signature(type(sched).__init__).parameters) - {"self"}
    assert set(config) == params

    restored = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(sched))
    assert type(restored) is type(sched) and restored.get_config() == config


def test_registered_under_package():
    for cls in ALL_CLASSES:
        name = keras.saving.get_registered_name(cls)
        assert name == f"keras_sam>{cls.__name__}"
        assert keras.saving.get_registered_object(name) is cls


# Keras' own saving code trips a numpy 2 DeprecationWarning (not ours).
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_save_and_load_model_keeps_schedule(tmp_path):
    sched = PolynomialDecay(0.1, 0.001, 6, [4, 2, 3], warmup_epochs=1, power=2.0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=sched), loss="mse")
    x = np.ones((24, 2), "float32")
    model.fit(x, x[:, :1], batch_size=8, epochs=2, verbose=0)  # 6 steps
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)

    lr_config = loaded.optimizer.get_config()["learning_rate"]
    assert lr_config["registered_name"] == "keras_sam>PolynomialDecay"
    restored = keras.optimizers.schedules.deserialize(lr_config)
    assert type(restored) is PolynomialDecay
    assert restored.get_config() == sched.get_config()
    assert int(loaded.optimizer.iterations) == 6
    lr_now = float(loaded.optimizer.learning_rate)
    assert lr_now == pytest.approx(float(sched(6)), rel=1e-7)


# --------------------------------------------------------------------------
# Bad input.

OK = dict(
    initial_learning_rate=0.1,
    final_learning_rate=0.001,
    epochs=10,
    steps_per_epoch=[5, 3],
    warmup_epochs=1,
)

BAD_SCHEDULE_ARGS = (
    [("initial_learning_rate", v) for v in [0, -0.1, float("nan"), float("inf"), "0.1", True, None]]
    + [("final_learning_rate", v) for v in [-1e-3, float("nan"), float("inf"), None, "0"]]
    + [("epochs", v) for v in [0, -3, 2.5, "10", True, None]]
    + [("warmup_epochs", v) for v in [-1, 10, 11.5, float("nan"), "1", None]]
    + [
        ("steps_per_epoch", v)
        for v in [0, -1, 2.5, [], [3, 0], [3, -1], [3, 2.5], (3, True), "5", None, {0: 3}]
    ]
)


@pytest.mark.parametrize("cls", [CosineAnnealing, LinearDecay, PolynomialDecay, ExponentialDecay])
@pytest.mark.parametrize("arg,value", BAD_SCHEDULE_ARGS, ids=repr)
def test_bad_schedule_arguments(cls, arg, value):
    with pytest.raises(ValueError, match=f"`{arg}` must be"):
        cls(**{**OK, arg: value})


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), "2"])
def test_bad_power(value):
    with pytest.raises(ValueError, match="`power` must be a finite float > 0"):
        PolynomialDecay(**OK, power=value)


def test_exponential_requires_positive_final():
    message = "`final_learning_rate` must be a finite float > 0"
    with pytest.raises(ValueError, match=message):
        ExponentialDecay(0.1, 0.0, 10, 5)
    # The other schedules accept final 0.
    for cls in [CosineAnnealing, LinearDecay, PolynomialDecay]:
        assert cls(0.1, 0.0, 10, 5).final_learning_rate == 0.0


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(initial_learning_rate=0), "initial_learning_rate"),
        (dict(initial_learning_rate=0.1, warmup_epochs=2), "steps_per_epoch"),
        (
            dict(initial_learning_rate=0.1, epochs=5, steps_per_epoch=3, warmup_epochs=5),
            "warmup_epochs",
        ),
        (dict(initial_learning_rate=0.1, epochs=0), "epochs"),
        (dict(initial_learning_rate=0.1, steps_per_epoch=[]), "steps_per_epoch"),
    ],
)
def test_bad_constant_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}` must be"):
        Constant(**kwargs)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(batch_schedule={}), "batch_schedule"),
        (dict(batch_schedule={1: 16}), "batch_schedule"),
        (dict(batch_schedule={0: 16, 1.5: 32}), "batch_schedule"),
        (dict(batch_schedule={0: 16, "2": 32}), "batch_schedule"),
        (dict(batch_schedule={0: 16, -1: 32}), "batch_schedule"),
        (dict(batch_schedule={0: 0}), "batch_schedule"),
        (dict(batch_schedule={0: -16}), "batch_schedule"),
        (dict(batch_schedule={0: 16.0}), "batch_schedule"),
        (dict(batch_schedule={0: 16, 500: "x"}), "batch_schedule"),  # past epochs too
        (dict(batch_schedule=0), "batch_schedule"),
        (dict(batch_schedule="16"), "batch_schedule"),
        (dict(batch_schedule=lambda e: 0), "batch_schedule"),
        (dict(batch_schedule=lambda e: 8.0), "batch_schedule"),
        (dict(batch_schedule={0: 16, 2: 2000}), "batch_schedule"),  # no step left
        (dict(epochs=2.5), "epochs"),
        (dict(epochs=0), "epochs"),
        (dict(epochs=None), "epochs"),
        (dict(num_examples=0), "num_examples"),
        (dict(num_examples=100.0), "num_examples"),
    ],
)
def test_bad_steps_per_epoch_arguments(kwargs, arg):
    args = dict(num_examples=1000, batch_schedule={0: 16, 4: 32}, epochs=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"`{arg}`"):
        schedules.steps_per_epoch(**args)


# --------------------------------------------------------------------------
# NumPy scalars: the same schedule as with Python scalars.

# (float type, int type): values below are exact in float32, so the results
# must be equal, not close.
NUMPY_TYPES = [
    (np.float32, np.int32),
    (np.float64, np.int64),
    (np.float32, np.int64),
    (lambda v: np.array(v, "float32"), lambda v: np.array(v, "int64")),
]
NUMPY_SCHEDULES = [
    (
        CosineAnnealing,
        dict(
            initial_learning_rate=0.125,
            final_learning_rate=2**-7,
            epochs=10,
            steps_per_epoch=[5, 3],
            warmup_epochs=1,
        ),
    ),
    (
        LinearDecay,
        dict(
            initial_learning_rate=0.125,
            final_learning_rate=0.0,
            epochs=10,
            steps_per_epoch=4,
            warmup_epochs=1.5,
        ),
    ),
    (
        PolynomialDecay,
        dict(
            initial_learning_rate=0.125,
            final_learning_rate=2**-7,
            epochs=10,
            steps_per_epoch=(5, 3),
            power=2.0,
        ),
    ),
    (
        ExponentialDecay,
        dict(
            initial_learning_rate=0.125,
            final_learning_rate=2**-7,
            epochs=10,
            steps_per_epoch=[5, 3],
            warmup_epochs=2,
        ),
    ),
    (Constant, dict(initial_learning_rate=0.125, steps_per_epoch=[5, 3], warmup_epochs=0.5)),
    (Constant, dict(initial_learning_rate=0.125, epochs=10)),
]


def _to_numpy(value, float_type, int_type):
    if isinstance(value, (list, tuple)):
        return type(value)(int_type(v) for v in value)
    if isinstance(value, int):
        return int_type(value)
    return float_type(value)


@pytest.mark.parametrize("float_type,int_type", NUMPY_TYPES)
@pytest.mark.parametrize("cls,kwargs", NUMPY_SCHEDULES)
def test_numpy_scalar_arguments_give_the_same_schedule(cls, kwargs, float_type, int_type):
    expected = cls(**kwargs)
    got = cls(**{k: _to_numpy(v, float_type, int_type) for k, v in kwargs.items()})
    config = got.get_config()
    assert config == expected.get_config()
    assert json.loads(json.dumps(config)) == json.loads(json.dumps(expected.get_config()))
    assert type(got.warmup_epochs) is type(expected.warmup_epochs)
    steps = np.arange(60)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(got(steps)), keras.ops.convert_to_numpy(expected(steps))
    )
    assert cls.from_config(json.loads(json.dumps(config))).get_config() == config


@pytest.mark.parametrize("int_type", [np.int32, np.int64])
def test_steps_per_epoch_accepts_numpy_ints(int_type):
    expected = schedules.steps_per_epoch(50000, PAPER_BATCHES, 200)
    batches = {int_type(k): int_type(v) for k, v in PAPER_BATCHES.items()}
    got = schedules.steps_per_epoch(int_type(50000), batches, int_type(200))
    assert got == expected and all(type(s) is int for s in got)
    got = schedules.steps_per_epoch(
        np.array(50000),
        lambda e: int_type(16 * 2 ** (e // 40)),
        np.array(200),
        drop_remainder=False,
    )
    assert got == schedules.steps_per_epoch(
        50000, lambda e: 16 * 2 ** (e // 40), 200, drop_remainder=False
    )
    assert schedules.steps_per_epoch(100, int_type(16), 3) == [6, 6, 6]


@pytest.mark.parametrize(
    "steps",
    [
        np.float32(5.0),
        np.int64(0),
        np.bool_(True),
        [5, np.float64(3.0)],
        [5, np.int32(-1)],
        np.array([5, 3]),
    ],
    ids=repr,
)
def test_numpy_bad_steps_still_rejected(steps):
    with pytest.raises(ValueError, match="`steps_per_epoch` must be"):
        CosineAnnealing(0.1, 0.0, 10, steps)
