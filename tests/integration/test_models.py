"""SAMModel / GSAMModel / SharpnessAwareMinimization against a hand-written
in-place reference step (perturb the variables, restore the saved copy) with
the perturbation and GSAM's combination computed in float64 NumPy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam

N, D, BATCH, STEPS = 48, 6, 16, 3
LR = 0.1


@keras.saving.register_keras_serializable(package="test_models")
class AddActivityLoss(keras.layers.Layer):
    """An `add_loss` term that depends on the activations."""

    def call(self, x):
        self.add_loss(0.01 * keras.ops.mean(keras.ops.square(x)))
        return x


def make_inner(seed=0, bn=True, synchronized=False):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((D,))
    h = keras.layers.Dense(8, activation="tanh", kernel_regularizer=keras.regularizers.L2(1e-3))(
        inputs
    )
    if bn:
        h = keras.layers.BatchNormalization(momentum=0.9, synchronized=synchronized)(h)
    h = AddActivityLoss()(h)
    outputs = keras.layers.Dense(2)(h)
    return keras.Model(inputs, outputs)


def make_data(seed=1, n=N):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype("float32")
    y = rng.normal(size=(n, 2)).astype("float32")
    sw = rng.uniform(0.5, 1.5, size=(n,)).astype("float32")
    return x, y, sw


def as_dataset(x, y, sw, batch=BATCH):
    return tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(batch)


# ----------------------------------------------------------------- reference
def _norm(xs):
    return np.sqrt(sum(float(np.sum(x * x)) for x in xs))


def reference_fit(
    model,
    x,
    y,
    sw,
    *,
    rho,
    lr_fn,
    kind="sam",
    alpha=0.0,
    adaptive=False,
    eta=0.01,
    rho_fn=None,
    splits=1,
    batch=BATCH,
    asam_rule="weights",
):
    """Trains `model` (a plain keras.Model) in place with a hand-written SAM step.

    ASAM's `T_w = |w| + eta` applies, by `asam_rule`, as the official ASAM code
    does ("weights": every parameter but biases and normalization offsets,
    Keras' `bias` / `beta`), to kernels only ("kernels": 2+ dimensions) or to
    every variable ("all").

    Returns per-step records (clean loss, perturbed loss, ||g||, rho).
    """
    loss_obj = keras.losses.MeanSquaredError()
    tv = model.trainable_variables
    state_vars = model.non_trainable_variables
    records = []

    def loss_and_grad(xb, yb, swb):
        with tf.GradientTape() as tape:
            pred = model(xb, training=True)
            loss = loss_obj(yb, pred, sample_weight=swb) + tf.add_n(model.losses)
        return float(loss), [g.numpy().astype(np.float64) for g in tape.gradient(loss, tv)]

    for step, start in enumerate(range(0, len(x), batch)):
        lr = lr_fn(step)
        rho_t = rho if rho_fn is None else rho_fn(lr)
        w0 = [v.numpy() for v in tv]
        s0 = [v.numpy() for v in state_vars]
        descents, new_states, stats = [], [], []
        m = batch // splits
        for k in range(splits):
            sl = slice(start + k * m, start + (k + 1) * m)
            for v, s in zip(state_vars, s0):
                v.assign(s)
            loss, g = loss_and_grad(x[sl], y[sl], sw[sl])  # clean pass, updates BN
            new_states.append([v.numpy() for v in state_vars])
            if adaptive:
                rule = {
                    "weights": lambda v, w: v.name not in ("bias", "beta"),
                    "kernels": lambda v, w: w.ndim >= 2,
                    "all": lambda v, w: True,
                }[asam_rule]
                t = [
                    np.abs(w.astype(np.float64)) + eta if rule(v, w) else 1.0
                    for v, w in zip(tv, w0)
                ]
                tg = [ti * gi for ti, gi in zip(t, g)]
                e = [rho_t * ti * ti * gi / (_norm(tg) + 1e-12) for ti, gi in zip(t, g)]
            else:
                e = [rho_t * gi / (_norm(g) + 1e-12) for gi in g]
            for v, w, ei in zip(tv, w0, e):
                v.assign((w + ei).astype(np.float32))
            loss_adv, gp = loss_and_grad(x[sl], y[sl], sw[sl])
            for v, w in zip(tv, w0):  # restore exactly
                v.assign(w)
            if kind == "gsam":
                coef = sum(np.sum(a * b) for a, b in zip(g, gp)) / (_norm(gp) ** 2 + 1e-12)
                d = [b - alpha * (a - coef * b) for a, b in zip(g, gp)]
            else:
                d = gp
            descents.append(d)
            stats.append((loss, loss_adv, _norm(g), rho_t))
        d = [np.mean(ds, axis=0) for ds in zip(*descents)]
        for v, ss in zip(state_vars, zip(*new_states)):
            v.assign(np.mean(ss, axis=0))
        for v, w, di in zip(tv, w0, d):
            v.assign((w - lr * di).astype(np.float32))
        records.append(np.mean(stats, axis=0))
    return np.array(records)


def assert_weights_close(a, b, rtol=2e-5, atol=2e-6):
    assert len(a.weights) == len(b.weights)
    for va, vb in zip(a.weights, b.weights):
        np.testing.assert_allclose(
            np.asarray(va.numpy(), np.float64),
            np.asarray(vb.numpy(), np.float64),
            rtol=rtol,
            atol=atol,
            err_msg=va.path,
        )


def fit_wrapper(wrapper, x, y, sw, optimizer=None, epochs=1):
    wrapper.compile(optimizer=optimizer or keras.optimizers.SGD(LR), loss="mse")
    return wrapper.fit(as_dataset(x, y, sw), epochs=epochs, verbose=0, shuffle=False)


# --------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "adaptive, scope",
    [(False, None), (True, None), (True, "kernels"), (True, "all")],
    ids=["sam", "asam-official-default", "asam-kernels", "asam-all"],
)
def test_sam_and_asam_match_in_place_reference(adaptive, scope):
    x, y, sw = make_data()
    rho = 0.5 if adaptive else 0.05
    kwargs = {} if scope is None else dict(adaptive_scope=scope)
    model = keras_sam.SAMModel(make_inner(), rho=rho, adaptive=adaptive, eta=0.01, **kwargs)
    history = fit_wrapper(model, x, y, sw)
    reference = make_inner()
    rec = reference_fit(
        reference,
        x,
        y,
        sw,
        rho=rho,
        lr_fn=lambda s: LR,
        adaptive=adaptive,
        asam_rule=scope or "weights",
    )
    assert_weights_close(model.inner, reference)
    # Logged values are the clean pass's loss, the SAM sharpness estimate and ||g||.
    np.testing.assert_allclose(
        history.history["loss"][0], _weighted_loss_mean(rec, x, BATCH), rtol=1e-5
    )
    np.testing.assert_allclose(
        history.history["sharpness"][0], np.mean(rec[:, 1] - rec[:, 0]), rtol=1e-3, atol=1e-7
    )
    np.testing.assert_allclose(history.history["grad_norm"][0], np.mean(rec[:, 2]), rtol=1e-5)
    np.testing.assert_allclose(history.history["rho"][0], rho, rtol=1e-7)


def _weighted_loss_mean(rec, x, batch):
    # Keras' loss tracker weights each batch's loss by its size.
    sizes = np.array([min(batch, len(x) - s) for s in range(0, len(x), batch)])
    return float(np.sum(rec[:, 0] * sizes) / sizes.sum())


def test_gsam_matches_reference_with_rho_following_the_learning_rate():
    x, y, sw = make_data()
    schedule = keras.optimizers.schedules.PolynomialDecay(
        0.2, decay_steps=2, end_learning_rate=0.05
    )
    model = keras_sam.GSAMModel(make_inner(), rho=0.1, alpha=0.3, rho_min=0.02)
    history = fit_wrapper(model, x, y, sw, optimizer=keras.optimizers.SGD(schedule))

    def lr_fn(step):  # the closed form of PolynomialDecay(power=1)
        return 0.05 + (0.2 - 0.05) * (1 - min(step, 2) / 2)

    def rho_fn(lr):
        return 0.02 + (0.1 - 0.02) * (lr - 0.05) / (0.2 - 0.05)

    reference = make_inner()
    rec = reference_fit(
        reference, x, y, sw, rho=None, lr_fn=lr_fn, kind="gsam", alpha=0.3, rho_fn=rho_fn
    )
    assert_weights_close(model.inner, reference)
    np.testing.assert_allclose(history.history["rho"][0], np.mean(rec[:, 3]), rtol=1e-6)
    assert sorted(set(np.round(rec[:, 3], 6))) == [0.02, 0.06, 0.1]


def test_gsam_alpha_zero_is_sam_exactly():
    x, y, sw = make_data()
    sam = keras_sam.SAMModel(make_inner(), rho=0.05)
    gsam = keras_sam.GSAMModel(make_inner(), rho=0.05, alpha=0.0)
    fit_wrapper(sam, x, y, sw, epochs=2)
    fit_wrapper(gsam, x, y, sw, epochs=2)
    for a, b in zip(sam.weights, gsam.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("cls", [keras_sam.SAMModel, keras_sam.GSAMModel])
def test_rho_zero_is_plain_keras_training_exactly(cls):
    x, y, sw = make_data()
    wrapped = cls(make_inner(), rho=0.0)
    fit_wrapper(wrapped, x, y, sw, epochs=2)
    plain = make_inner()
    plain.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    plain.fit(as_dataset(x, y, sw), epochs=2, verbose=0, shuffle=False)
    for a, b in zip(wrapped.inner.weights, plain.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_weights_return_exactly_and_batchnorm_moves_once_from_clean_pass():
    x, y, sw = make_data()
    inner = make_inner()
    initial = [v.numpy() for v in inner.trainable_variables]
    model = keras_sam.SAMModel(inner, rho=0.5)
    # With a zero learning rate the optimizer's update is exactly zero, so the
    # weights must come back bit for bit from the perturbation.
    fit_wrapper(model, x[:BATCH], y[:BATCH], sw[:BATCH], optimizer=keras.optimizers.SGD(0.0))
    for v, w in zip(inner.trainable_variables, initial):
        np.testing.assert_array_equal(v.numpy(), w)
    # One BatchNorm update from the clean pass at w, in training mode.
    dense, bn = inner.layers[1], inner.layers[2]
    h = np.tanh(x[:BATCH].astype(np.float64) @ initial[0] + initial[1])
    expected_mean = 0.9 * 0.0 + 0.1 * h.mean(axis=0)
    expected_var = 0.9 * 1.0 + 0.1 * h.var(axis=0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected_mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(bn.moving_variance.numpy(), expected_var, rtol=1e-5)
    assert dense is not None


def test_both_passes_run_in_training_mode_with_the_same_dropout_mask():
    """A layer that is the identity at inference and a fixed offset in training:
    if either pass ran in inference mode the gradient would differ."""
    seen = []

    class Probe(keras.layers.Layer):
        def call(self, x, training=None):
            seen.append(training)
            return x + (1.0 if training else 0.0)

    keras.utils.set_random_seed(3)
    inputs = keras.Input((D,))
    h = keras.layers.Dense(4)(inputs)
    h = keras.layers.Dropout(0.5)(Probe()(h))
    inner = keras.Model(inputs, keras.layers.Dense(1)(h))
    model = keras_sam.SAMModel(inner, rho=0.05)
    model.compile(optimizer="sgd", loss="mse")
    x, y, _ = make_data()
    model.fit(x, y[:, :1], batch_size=BATCH, epochs=1, verbose=0)
    assert seen and all(t is True for t in seen[-2:]), seen

    # Same dropout mask in both passes: with a radius of 0 the perturbed
    # gradient equals the clean one bit for bit. (`rho=0` itself skips the
    # second pass; a radius of 0 from `current_rho` still runs it.)
    grads = []

    class ZeroRadius(keras_sam.SAMModel):
        def current_rho(self):
            return 0.0

        def descent(self, gradients, perturbed_gradients):
            grads.append((gradients, perturbed_gradients))
            return super().descent(gradients, perturbed_gradients)

    w = ZeroRadius(inner, rho=0.05)
    w.compile(optimizer="sgd", loss="mse", run_eagerly=True)
    w.fit(x[:BATCH], y[:BATCH, :1], batch_size=BATCH, epochs=1, verbose=0)
    g, gp = grads[0]
    for a, b in zip(g, gp):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_num_batch_splits_averages_sub_batch_gradients():
    x, y, sw = make_data()
    model = keras_sam.SharpnessAwareMinimization(make_inner(), rho=0.05, num_batch_splits=2)
    fit_wrapper(model, x, y, sw)
    reference = make_inner()
    reference_fit(reference, x, y, sw, rho=0.05, lr_fn=lambda s: LR, splits=2)
    assert_weights_close(model.inner, reference)


def test_sub_batch_size_equals_num_batch_splits():
    x, y, sw = make_data()
    a = keras_sam.SAMModel(make_inner(), rho=0.05, num_batch_splits=4)
    b = keras_sam.SAMModel(make_inner(), rho=0.05, sub_batch_size=BATCH // 4)
    fit_wrapper(a, x, y, sw)
    fit_wrapper(b, x, y, sw)
    for va, vb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())


def test_num_batch_splits_not_dividing_the_batch_is_an_error_before_training():
    x, y, sw = make_data()
    inner = make_inner()
    before = [v.numpy() for v in inner.weights]
    model = keras_sam.SharpnessAwareMinimization(inner, num_batch_splits=3)
    with pytest.raises(ValueError, match="num_batch_splits"):
        fit_wrapper(model, x, y, sw)
    for v, w in zip(inner.weights, before):
        np.testing.assert_array_equal(v.numpy(), w)


def test_legacy_signature():
    m = keras_sam.SharpnessAwareMinimization(make_inner(), 0.1, 2, name="legacy")
    assert (m.rho, m.num_batch_splits, m.name) == (0.1, 2, "legacy")


# -------------------------------------------------------------------- saving
@pytest.mark.parametrize(
    "make",
    [
        lambda inner: keras_sam.SAMModel(
            inner, rho=0.07, adaptive=True, eta=0.02, sync_perturbation=True
        ),
        lambda inner: keras_sam.GSAMModel(
            inner, rho=0.08, alpha=0.1, rho_min=0.01, lr_max=0.1, lr_min=0.001
        ),
        lambda inner: keras_sam.SharpnessAwareMinimization(inner, rho=0.03, num_batch_splits=2),
    ],
    ids=["sam", "gsam", "legacy"],
)
def test_save_load_round_trip_and_training_on(tmp_path, make):
    x, y, sw = make_data()
    model = make(make_inner())
    fit_wrapper(model, x, y, sw, optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(model)
    config, loaded_config = model.get_config(), loaded.get_config()
    config.pop("model"), loaded_config.pop("model")
    assert config == loaded_config
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    ds = as_dataset(x, y, sw)
    model.fit(ds, epochs=1, verbose=0, shuffle=False)
    loaded.fit(ds, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0))


@keras.saving.register_keras_serializable(package="test_models")
class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(5, activation="relu")
        self.out = keras.layers.Dense(2)

    def call(self, x):
        return self.out(self.hidden(x))


@pytest.mark.parametrize("kind", ["sequential", "subclassed"])
def test_wraps_sequential_and_subclassed_models(tmp_path, kind):
    keras.utils.set_random_seed(0)
    if kind == "sequential":
        inner = keras.Sequential(
            [keras.Input((D,)), keras.layers.Dense(5, activation="relu"), keras.layers.Dense(2)]
        )
    else:
        inner = Subclassed()
        inner(np.zeros((1, D), "float32"))
    x, y, sw = make_data()
    model = keras_sam.SAMModel(inner, rho=0.05)
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    evaluated = model.evaluate(x, y, verbose=0, return_dict=True)
    np.testing.assert_allclose(model.predict(x, verbose=0), inner.predict(x, verbose=0))
    np.testing.assert_allclose(
        evaluated["loss"], np.mean((inner.predict(x, verbose=0) - y) ** 2), rtol=1e-5
    )
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(rho=-0.1), "rho"),
        (dict(rho=float("nan")), "rho"),
        (dict(eta=-1.0), "eta"),
        (dict(num_batch_splits=0), "num_batch_splits"),
        (dict(num_batch_splits=1.5), "num_batch_splits"),
        (dict(sub_batch_size=-2), "sub_batch_size"),
        (dict(adaptive_scope="biases"), "adaptive_scope"),
    ],
)
def test_sam_bad_arguments(kwargs, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        keras_sam.SAMModel(make_inner(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(alpha=-0.5), "alpha"),
        (dict(rho=0.05, rho_min=0.1), "rho_min"),
        (dict(rho_min=-0.1), "rho_min"),
        (dict(lr_max=0.1), "lr_min"),
    ],
)
def test_gsam_bad_arguments(kwargs, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        keras_sam.GSAMModel(make_inner(), **kwargs)


def test_model_must_be_a_built_keras_model():
    with pytest.raises(TypeError, match="model"):
        keras_sam.SAMModel(keras.layers.Dense(3))
    with pytest.raises(ValueError, match="not built"):
        keras_sam.SAMModel(Subclassed())


def test_gsam_unknown_schedule_range_names_lr_max():
    class Custom(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return 0.1

    model = keras_sam.GSAMModel(make_inner(), rho_min=0.01)
    x, y, sw = make_data()
    with pytest.raises(ValueError, match="lr_max"):
        fit_wrapper(model, x, y, sw, optimizer=keras.optimizers.SGD(Custom()))


def test_gsam_rho_follows_a_keras_sam_schedule_over_epochs():
    """rho_t from the optimizer's actual lr of a keras_sam CosineAnnealing,
    whose range GSAM reads from the schedule itself."""
    x, y, sw = make_data()
    steps = N // BATCH
    schedule = keras_sam.schedules.CosineAnnealing(0.2, 0.02, epochs=2, steps_per_epoch=steps)
    model = keras_sam.GSAMModel(make_inner(), rho=0.1, alpha=0.2, rho_min=0.02)
    history = fit_wrapper(model, x, y, sw, optimizer=keras.optimizers.SGD(schedule), epochs=2)

    def lr_at(step):  # closed form at the fractional epoch step / steps
        return 0.02 + (0.2 - 0.02) * (1 + np.cos(np.pi * step / (2 * steps))) / 2

    def rho_fn(lr):
        return 0.02 + (0.1 - 0.02) * (lr - 0.02) / (0.2 - 0.02)

    reference = make_inner()
    for epoch in range(2):
        rec = reference_fit(
            reference,
            x,
            y,
            sw,
            rho=None,
            kind="gsam",
            alpha=0.2,
            lr_fn=lambda s, e=epoch: lr_at(s + e * steps),
            rho_fn=rho_fn,
        )
        np.testing.assert_allclose(history.history["rho"][epoch], np.mean(rec[:, 3]), rtol=1e-5)
    assert_weights_close(model.inner, reference)


# ------------------------------------------------- paths users take with fit
def test_numpy_scalars_are_accepted_as_hyperparameters(tmp_path):
    x, y, sw = make_data()
    a = keras_sam.GSAMModel(
        make_inner(), rho=0.05, alpha=0.1, rho_min=0.01, lr_max=0.2, lr_min=0.0, num_batch_splits=2
    )
    b = keras_sam.GSAMModel(
        make_inner(),
        rho=np.float32(0.05),
        alpha=np.float64(0.1),
        rho_min=np.float32(0.01),
        lr_max=np.float32(0.2),
        lr_min=np.int64(0),
        num_batch_splits=np.int64(2),
        eta=np.float32(0.01),
    )
    config = b.get_config()
    assert type(config["num_batch_splits"]) is int and type(config["rho"]) is float
    import json

    json.dumps({k: v for k, v in config.items() if k != "model"})
    fit_wrapper(a, x, y, sw)
    fit_wrapper(b, x, y, sw)
    # np.float32(0.05) is 0.05 rounded to float32: same radius to 1e-8.
    assert_weights_close(a.inner, b.inner, rtol=1e-6, atol=1e-7)


def _generator(x, y, batch, offset=0):
    for start in range(offset, len(x), batch):
        yield x[start : start + batch], y[start : start + batch]


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, y, batch):
        super().__init__()
        self.x, self.y, self.batch = x, y, batch

    def __len__(self):
        return -(-len(self.x) // self.batch)

    def __getitem__(self, i):
        s = slice(i * self.batch, (i + 1) * self.batch)
        return self.x[s], self.y[s]


@pytest.mark.parametrize("source", ["generator", "pydataset", "unknown-batch-dataset"])
def test_split_check_runs_on_the_first_batch_of_any_input(source):
    """A batch of 32 cannot be cut into 3 equal sub-batches: the error comes
    before any weight changes, whatever feeds `fit`."""
    x, y, _ = make_data(n=64)
    data = {
        "generator": lambda: _generator(x, y, 32),
        "pydataset": lambda: _Batches(x, y, 32),
        "unknown-batch-dataset": lambda: tf.data.Dataset.from_generator(
            lambda: _generator(x, y, 32),
            output_signature=(tf.TensorSpec((None, D)), tf.TensorSpec((None, 2))),
        ),
    }[source]
    model = keras_sam.SAMModel(make_inner(), rho=0.05, num_batch_splits=3)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    before = [v.numpy().copy() for v in model.variables]
    with pytest.raises(ValueError, match="num_batch_splits`=3 does not divide"):
        model.fit(data(), epochs=1, verbose=0)
    for v, w in zip(model.variables, before):
        np.testing.assert_array_equal(v.numpy(), w)
    assert int(model.optimizer.iterations) == 0


def test_generator_input_keeps_every_batch_after_the_check():
    """The check peeks at the generator's first batch and gives it back: the
    run equals one on the same batches as a dataset."""
    x, y, _ = make_data()
    a = keras_sam.SAMModel(make_inner(), rho=0.05, num_batch_splits=2)
    b = keras_sam.SAMModel(make_inner(), rho=0.05, num_batch_splits=2)
    for model in (a, b):
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    a.fit(_generator(x, y, BATCH), epochs=1, verbose=0)
    b.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH), epochs=1, verbose=0)
    assert_weights_close(a.inner, b.inner, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("batch", [8, 16])
def test_sub_batch_size_splits_batches_of_unknown_size_into_batch_over_m(batch):
    """A batch whose size TensorFlow does not know when it traces the step
    (here from_generator) is cut into batch / sub_batch_size parts: the same
    weights as the hand-written step with that many sub-batches."""
    x, y, sw = make_data()
    m = 2
    spec = (tf.TensorSpec((None, D)), tf.TensorSpec((None, 2)), tf.TensorSpec((None,)))

    def gen():
        for s in range(0, N, batch):
            yield x[s : s + batch], y[s : s + batch], sw[s : s + batch]

    model = keras_sam.SAMModel(make_inner(), rho=0.05, sub_batch_size=m)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    model.fit(tf.data.Dataset.from_generator(gen, output_signature=spec), epochs=1, verbose=0)
    reference = make_inner()
    reference_fit(reference, x, y, sw, rho=0.05, lr_fn=lambda s: LR, splits=batch // m, batch=batch)
    assert_weights_close(model.inner, reference)


def test_gsam_rho_follows_learning_rate_scheduler_with_a_float_rate():
    """Float rate: lr_max is the rate when fit starts, lr_min 0, and rho follows
    the rate a LearningRateScheduler sets each epoch."""
    x, y, sw = make_data()
    rates = [0.2, 0.05]
    model = keras_sam.GSAMModel(make_inner(), rho=0.1, alpha=0.2, rho_min=0.02)
    model.compile(optimizer=keras.optimizers.SGD(0.2), loss="mse")
    callback = keras.callbacks.LearningRateScheduler(lambda epoch: rates[epoch])
    history = model.fit(
        as_dataset(x, y, sw), epochs=2, verbose=0, shuffle=False, callbacks=[callback]
    )

    def rho_fn(lr):
        return 0.02 + (0.1 - 0.02) * lr / 0.2

    reference = make_inner()
    for epoch, lr in enumerate(rates):
        reference_fit(
            reference,
            x,
            y,
            sw,
            rho=None,
            kind="gsam",
            alpha=0.2,
            lr_fn=lambda s, lr=lr: lr,
            rho_fn=rho_fn,
        )
        np.testing.assert_allclose(history.history["rho"][epoch], rho_fn(lr), rtol=1e-6)
    assert_weights_close(model.inner, reference)


def test_gsam_float_rate_outside_fit_asks_for_lr_max():
    model = keras_sam.GSAMModel(make_inner(), rho_min=0.01)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y, _ = make_data()
    with pytest.raises(RuntimeError, match="lr_max"):
        model.train_on_batch(x[:BATCH], y[:BATCH])


def test_evaluate_reports_no_training_statistics():
    x, y, sw = make_data()
    model = keras_sam.SAMModel(make_inner(), rho=0.05)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", metrics=["mae"])
    history = model.fit(as_dataset(x, y, sw), validation_data=(x, y), epochs=1, verbose=0)
    assert {"sharpness", "grad_norm", "rho"} <= set(history.history)
    assert not {"val_sharpness", "val_grad_norm", "val_rho"} & set(history.history)
    result = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(result) == {"loss", "mae"}
    plain = model.inner
    plain.compile(loss="mse", metrics=["mae"])
    expected = plain.evaluate(x, y, verbose=0, return_dict=True)
    np.testing.assert_allclose(result["loss"], expected["loss"], rtol=1e-6)
    np.testing.assert_allclose(result["mae"], expected["mae"], rtol=1e-6)


def test_export_serves_the_predictions_of_predict(tmp_path):
    x, y, sw = make_data()
    model = keras_sam.SAMModel(make_inner(), rho=0.05)
    fit_wrapper(model, x, y, sw)
    path = str(tmp_path / "served")
    model.export(path, verbose=False)
    loaded = tf.saved_model.load(path)  # keep a reference: it owns the variables
    served = loaded.serve(tf.constant(x))
    np.testing.assert_allclose(served.numpy(), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6)


def test_metrics_with_sub_batches_of_unknown_size():
    """`.batch(8)` without drop_remainder: TF traces an unknown batch size and
    runs the sub-batch loop as a graph loop; the compiled metrics see the
    whole batch's predictions, as with static shapes."""
    x, y, _ = make_data()
    y = (y > 0).astype("float32")
    runs = []
    for drop in (True, False):
        model = keras_sam.SAMModel(make_inner(), rho=0.05, num_batch_splits=2)
        model.compile(
            optimizer=keras.optimizers.SGD(LR),
            loss="mse",
            metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)],
        )
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=drop)
        runs.append((model, model.fit(data, epochs=1, verbose=0, shuffle=False)))
    (a, ha), (b, hb) = runs
    assert_weights_close(a.inner, b.inner, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ha.history["binary_accuracy"], hb.history["binary_accuracy"])


def test_fit_takes_keras_positional_arguments_and_small_arrays():
    x, y, _ = make_data(n=10)
    model = keras_sam.SAMModel(make_inner(), rho=0.05, num_batch_splits=5)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    history = model.fit(x, y, 32, 2, 0)  # batch_size=32 > 10 rows: one batch of 10
    assert len(history.history["loss"]) == 2
    assert int(model.optimizer.iterations) == 2


def test_gsam_lr_min_above_the_starting_rate_is_an_error_before_training():
    model = keras_sam.GSAMModel(make_inner(), rho_min=0.01, lr_min=0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y, _ = make_data()
    with pytest.raises(ValueError, match="lr_min"):
        model.fit(x, y, verbose=0)
    assert int(model.optimizer.iterations) == 0


@pytest.mark.parametrize("rho, passes", [(0.0, 1), (0.05, 2)])
def test_rho_zero_takes_one_forward_pass_per_step(rho, passes):
    """`rho=0` is plain training at plain cost: the second pass (at `w + 0`,
    the same gradient) is skipped when the step is traced."""
    calls = []

    class Count(keras.layers.Layer):
        def call(self, x):
            calls.append(1)
            return x

    inputs = keras.Input((D,))
    inner = keras.Model(inputs, keras.layers.Dense(1)(Count()(inputs)))
    model = keras_sam.SAMModel(inner, rho=rho)
    model.compile(optimizer="sgd", loss="mse", run_eagerly=True)
    x, y, _ = make_data()
    calls.clear()
    model.fit(x[: 3 * BATCH], y[: 3 * BATCH, :1], batch_size=BATCH, epochs=1, verbose=0)
    assert len(calls) == 3 * passes
