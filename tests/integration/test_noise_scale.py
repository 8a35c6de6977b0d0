"""The gradient noise scale's two-batch-size estimates (rules.noise_scale_terms)
against the closed form of a least-squares problem."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_sam
from keras_sam import rules


def test_estimates_match_the_closed_form_of_least_squares():
    # Per-example loss 0.5 (x.w - y)^2 with x ~ N(0, I_d), y = x.w* + eps,
    # eps ~ N(0, s^2), at w = w* + delta: the per-example gradient
    # g = x (x.delta - eps) has mean G = delta and covariance
    # Sigma = (|delta|^2 + s^2) I + delta delta^T (Gaussian fourth moments), so
    # |G|^2 = |delta|^2 and tr(Sigma) = d (|delta|^2 + s^2) + |delta|^2.
    rng = np.random.default_rng(0)
    d, s, half, batches = 5, 0.5, 16, 40_000
    delta = rng.normal(size=d)
    delta /= np.linalg.norm(delta)
    x = rng.normal(size=(batches, 2 * half, d))
    eps = s * rng.normal(size=(batches, 2 * half))
    g = x * (x @ delta - eps)[..., None]  # per-example gradients
    # As SAM's sub-batches: the two halves of each batch and the whole batch.
    small = np.mean([np.sum(g[:, k * half : (k + 1) * half].mean(1) ** 2, -1) for k in (0, 1)], 0)
    large = np.sum(g.mean(1) ** 2, -1)
    squared, trace = rules.noise_scale_terms(
        ops.convert_to_tensor(small.mean()), ops.convert_to_tensor(large.mean()), half, 2 * half
    )
    assert float(ops.convert_to_numpy(squared)) == pytest.approx(1.0, rel=0.05)
    assert float(ops.convert_to_numpy(trace)) == pytest.approx(d * (1 + s * s) + 1, rel=0.05)
    # Each batch's estimate is unbiased: their mean is the estimate of the means.
    per_batch = [
        [float(ops.convert_to_numpy(t)) for t in rules.noise_scale_terms(a, b, half, 2 * half)]
        for a, b in zip(small[:200], large[:200])
    ]
    np.testing.assert_allclose(
        np.mean(per_batch, 0),
        [
            float(ops.convert_to_numpy(t))
            for t in rules.noise_scale_terms(small[:200].mean(), large[:200].mean(), half, 2 * half)
        ],
        rtol=1e-9,
    )


@pytest.mark.parametrize("sizes", [(0, 8), (8, 8), (16, 8), (-1, 4)])
def test_batch_sizes_must_be_increasing_and_positive(sizes):
    with pytest.raises(ValueError, match="small_batch"):
        rules.noise_scale_terms(1.0, 1.0, *sizes)


# ---------------------------------------------------------------------------
# The estimate inside the training step, on every backend
# (tests/support/noise_scale_check.py), against a float64 NumPy replay of the same
# batches and against the closed form.

import noise_scale_check as check  # noqa: E402
from conftest import NOISE_SCALE_RUNS as BACKEND_RUNS  # noqa: E402


def replay_noise_scale(parts):
    """What the step computes, in float64: per step, the parts' mean
    gradients against the batch's, the two-size estimates, their moving
    averages, and the ratio at the end."""
    x, y, w0 = (a.astype("float64") for a in check.least_squares())
    average = np.zeros(2)
    for s in range(check.STEPS):
        xb, yb = (
            x[s * check.BATCH : (s + 1) * check.BATCH],
            y[s * check.BATCH : (s + 1) * check.BATCH],
        )
        g = 2 * (xb @ w0 - yb[:, 0])[:, None] * xb  # per-example gradients of (x.w - y)^2
        small = np.mean([np.sum(p.mean(0) ** 2) for p in np.split(g, parts)])
        large = np.sum(g.mean(0) ** 2)
        b, big = check.BATCH / parts, check.BATCH
        terms = [(big * large - b * small) / (big - b), (small - large) / (1 / b - 1 / big)]
        average = check.DECAY * average + (1 - check.DECAY) * np.array(terms)
    return average[1] / average[0]


CLOSED_FORM = check.D * (1 + check.NOISE**2) + 1
"""tr(Sigma) / |G|^2 at w* + delta, |delta| = 1 (see the first test)."""


@pytest.mark.parametrize("backend, parallel", BACKEND_RUNS)
@pytest.mark.parametrize("case", ["sam", "plain", "gsam", "splits"])
def test_step_estimate_matches_replay_and_closed_form(
    noise_scale_backends, backend, parallel, case
):
    if (backend, parallel) not in noise_scale_backends:
        pytest.skip(f"{backend} is not installed")
    got = noise_scale_backends[(backend, parallel)][case]["noise_scale"]
    # The parts: num_batch_splits=4 sub-batches on each device; else on one
    # device the halves of each batch, under DataParallel the two shards.
    per_device = 4 if case == "splits" else (1 if parallel else 2)
    parts = per_device * (2 if parallel else 1)
    assert got == pytest.approx(replay_noise_scale(parts), rel=1e-3)
    # 800 batches of 64: the averaged estimate is within 5% of the truth.
    assert got == pytest.approx(CLOSED_FORM, rel=0.05)


def test_every_backend_agrees(noise_scale_backends):
    values = {k: v["sam"]["noise_scale"] for k, v in noise_scale_backends.items()}
    reference = values[("tensorflow", False)]
    for key, value in values.items():
        assert value == pytest.approx(reference, rel=1e-5), key


# ---------------------------------------------------------------------------
# In this process (TensorFlow): replicas, mixed precision, arguments, edges.

tensorflow_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="MirroredStrategy is TensorFlow's"
)


def small_fit(strategy=None, lr=0.1, epochs=2, **kwargs):
    """SAM with the estimate on a two-layer net: `(history, model)`."""
    import contextlib

    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    with strategy.scope() if strategy else contextlib.nullcontext():
        inner = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
        )
        rng = np.random.default_rng(0)
        for v in inner.trainable_variables:
            v.assign(rng.normal(scale=0.5, size=v.shape).astype("float32"))
        kwargs = {"rho": 0.05, "noise_scale": True, "noise_scale_decay": 0.9, **kwargs}
        model = keras_sam.SAMModel(inner, **kwargs)
        model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return history, model


@tensorflow_only
@pytest.mark.parametrize("sync", [False, True])
def test_two_replicas_measure_what_two_sub_batches_do(sync):
    """The parts are the replicas: under MirroredStrategy(2) the estimate is
    that of `num_batch_splits=2` on one device (the same parts), every
    replica holds the same averages, and with the per-replica perturbation
    the training is the same too."""
    from strategies import mirrored

    strategy = mirrored(2)
    lr = 0.1 if not sync else 0.0  # a global perturbation trains differently
    got, model = small_fit(strategy, lr=lr, sync_perturbation=sync)
    want, reference = small_fit(lr=lr, num_batch_splits=2)
    np.testing.assert_allclose(got.history["noise_scale"], want.history["noise_scale"], rtol=1e-4)
    local = [t.numpy() for t in strategy.experimental_local_results(model._noise.average.value)]
    assert len(local) == 2
    np.testing.assert_array_equal(local[0], local[1])
    np.testing.assert_allclose(local[0], reference._noise.average.numpy(), rtol=1e-4)
    if not sync:
        for a, b in zip(model.inner.get_weights(), reference.inner.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@tensorflow_only
def test_mixed_float16_measures_in_loss_units(mixed_float16):
    """Under a LossScaleOptimizer the gradients carry the loss scale; the
    estimate divides it out (the ratio would hide a missing square)."""
    got, model = small_fit(lr=0.0)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    keras.mixed_precision.set_global_policy("float32")
    want, reference = small_fit(lr=0.0)
    np.testing.assert_allclose(got.history["noise_scale"], want.history["noise_scale"], rtol=2e-2)
    np.testing.assert_allclose(
        model._noise.average.numpy(), reference._noise.average.numpy(), rtol=2e-2
    )


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_a_batch_of_one_example_leaves_the_averages():
    """drop_remainder=False with 16k + 1 examples: the last batch of one has
    no halves; it trains as usual and leaves the averages (no NaN)."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(17, 6)).astype("float32")
    y = rng.normal(size=(17, 1)).astype("float32")
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    model = keras_sam.SAMModel(inner, rho=0.05, noise_scale=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    averages = []

    class Averages(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            averages.append(np.array(ops.convert_to_numpy(model._noise.average)))

    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[Averages()])
    assert len(averages) == 2
    np.testing.assert_array_equal(averages[1], averages[0])
    assert all(np.all(np.isfinite(w)) for w in inner.get_weights())


def test_config_round_trip_and_saved_averages(tmp_path):
    history, model = small_fit(epochs=1)
    config = model.get_config()
    assert config["noise_scale"] is True and config["noise_scale_decay"] == 0.9
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.noise_scale is True
    np.testing.assert_array_equal(
        ops.convert_to_numpy(loaded._noise.average), ops.convert_to_numpy(model._noise.average)
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(noise_scale=1), "noise_scale"),
        (dict(noise_scale=True, noise_scale_decay=1.0), "noise_scale_decay"),
        (dict(noise_scale=True, noise_scale_decay=-0.1), "noise_scale_decay"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match=match):
        keras_sam.SAMModel(inner, **kwargs)


@pytest.mark.parametrize("cls", ["MSAMModel", "MESAModel"])
def test_one_gradient_methods_refuse_the_estimate(cls):
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="noise_scale"):
        getattr(keras_sam, cls)(inner, noise_scale=True)


@pytest.mark.parametrize(
    "wrapper,kwargs",
    [
        ("SAMModel", dict(rho=0.05)),
        ("SAMModel", dict(rho=0.0)),
        ("SAMModel", dict(rho=0.05, num_batch_splits=2)),
        ("SAMModel", dict(rho=0.05, sam_every=2)),
        ("GSAMModel", dict(rho=0.05, alpha=0.1)),
        ("LookSAMModel", dict(rho=0.05, sam_every=2)),
        ("AESAMModel", dict(rho=0.05, threshold=0.0)),
    ],
    ids=["sam", "plain", "splits", "every2", "gsam", "looksam", "aesam"],
)
def test_the_estimate_adds_no_gradient_evaluation(wrapper, kwargs):
    """Counted in examples through the forward passes: the same with the
    estimate as without (on one device the clean pass runs as two halves).
    Both runs start from the same seeded weights: AE-SAM's choice of steps
    depends on the gradients, and an unseeded kernel drew other weights
    after other tests had run."""
    seen = []

    class Count(keras.layers.Layer):
        def call(self, x):
            if x.shape[0] is not None:  # not while the functional model is built
                seen.append(int(x.shape[0]))
            return x

    def examples(noise_scale):
        inputs = keras.Input((3,))
        dense = keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(0))
        inner = keras.Model(inputs, dense(Count()(inputs)))
        model = getattr(keras_sam, wrapper)(inner, noise_scale=noise_scale, **kwargs)
        model.compile(optimizer="sgd", loss="mse", run_eagerly=True)
        x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
        seen.clear()
        model.fit(x, x[:, :1], batch_size=8, epochs=1, shuffle=False, verbose=0)
        return sum(seen)

    assert examples(True) == examples(False)


@tensorflow_only
def test_uneven_replica_batches_are_left_out_alike():
    """17 examples in batches of 16 on two replicas: the last batch of one
    example splits 1 / 0, and both replicas leave that step out, so their
    averages stay one value (counted: one measured step)."""
    from strategies import mirrored

    strategy = mirrored(2)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(17, 6)).astype("float32")
    y = rng.normal(size=(17, 1)).astype("float32")
    with strategy.scope():
        inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
        model = keras_sam.SAMModel(inner, rho=0.05, noise_scale=True)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    local = [t.numpy() for t in strategy.experimental_local_results(model._noise.average.value)]
    np.testing.assert_array_equal(local[0], local[1])
    assert local[0][2] == 1.0


def test_no_measured_step_logs_nan():
    """Batches of one example hold no two parts: nothing is measured, and
    the logged noise scale is NaN (an AdaptiveBatchSize keeps the batch)."""
    x = np.ones((3, 2), "float32")
    inner = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model = keras_sam.SAMModel(inner, rho=0.05, noise_scale=True)
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(x, x[:, :1], batch_size=1, epochs=1, verbose=0)
    assert np.isnan(history.history["noise_scale"][-1])
    np.testing.assert_array_equal(ops.convert_to_numpy(model._noise.average), [0, 0, 0])


def test_a_loss_that_is_not_mean_reduced_is_refused_before_training():
    inner = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model = keras_sam.SAMModel(inner, rho=0.05, noise_scale=True)
    model.compile(optimizer="sgd", loss=keras.losses.MeanSquaredError(reduction="sum"))
    before = inner.get_weights()
    with pytest.raises(ValueError, match="reduction='sum'"):
        model.fit(np.ones((4, 2)), np.ones((4, 1)), verbose=0)
    for a, b in zip(inner.get_weights(), before):
        np.testing.assert_array_equal(a, b)
