"""SAMModel / GSAMModel under tf.distribute.MirroredStrategy (TF backend).

conftest.py splits the CPU into 4 logical devices, so 2 and 4 replicas run
on one CPU. What is checked:

1. Default mode (`sync_perturbation=False`, m-sharpness): against a
   hand-written one-device reference below (`reference_per_replica`) that cuts
   each global batch into the replicas' contiguous shards, perturbs a plain
   Keras model IN PLACE per shard with GradientTape, restores it, averages
   the per-shard descent gradients and applies plain SGD.
2. `sync_perturbation=True` with synchronized BatchNorm: weights and moving
   statistics equal the single-device run of the same wrapper.
3. Every MirroredVariable holds bitwise-identical copies on all replicas after
   EVERY step (a callback checks it in `on_train_batch_end`).
4. mixed_float16: both losses are scaled (update and `grad_norm` match the
   float32 reference of 1./2., loss scale untouched on finite steps); a step whose gradients
   are non-finite on ONE replica only is skipped on all replicas and halves
   the loss scale. Two counterfactual tests show the same scenario breaks
   a plain keras.Model (Keras' LossScaleOptimizer checks replica 0 only) and a
   SAMModel whose all-reduce workaround is taken out.
5. The logged `loss` is the clean loss of the global batch, as on one device.
"""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from strategies import mirrored

import keras_sam

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute.MirroredStrategy is TensorFlow-only",
)

IN_DIM, HIDDEN, OUT_DIM = 5, 8, 3
GLOBAL_BATCH = 16
STEPS = 3
LR = 0.1
RHO = 0.1  # large enough that per-replica and global perturbations differ
ALPHA = 0.5
ATOL = RTOL = 1e-5


# --------------------------------------------------------------------------
# Helpers.


def make_inner(bn=False):
    layers = [keras.Input((IN_DIM,)), keras.layers.Dense(HIDDEN)]
    if bn:
        layers.append(keras.layers.BatchNormalization(synchronized=True, momentum=0.5))
    layers += [keras.layers.Activation("tanh"), keras.layers.Dense(OUT_DIM)]
    return keras.Sequential(layers)


def initial_values(model, seed=0):
    """Fixed initial values for the trainable variables of `make_inner()`."""
    rng = np.random.default_rng(seed)
    values = []
    for v in model.trainable_variables:
        scale = 0.1 if v.name == "gamma" else 0.6
        base = 1.0 if v.name == "gamma" else 0.0
        values.append((base + scale * rng.normal(size=v.shape)).astype("float32"))
    return values


def set_trainable(model, values):
    for v, a in zip(model.trainable_variables, values):
        v.assign(a)


def make_data(n_examples=GLOBAL_BATCH * STEPS, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_examples, IN_DIM)).astype("float32")
    y = rng.normal(size=(n_examples, OUT_DIM)).astype("float32")
    return x, y


def dataset(x, y, batch=GLOBAL_BATCH):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def wrap(kind, inner, sync):
    if kind == "sam":
        return keras_sam.SAMModel(inner, rho=RHO, sync_perturbation=sync)
    return keras_sam.GSAMModel(inner, rho=RHO, alpha=ALPHA, sync_perturbation=sync)


def numpy_values(variables):
    return [np.array(v.numpy()) for v in variables]


def local_values(strategy, variable):
    """The per-replica copies of a Keras variable, as numpy arrays."""
    return [np.array(t.numpy()) for t in strategy.experimental_local_results(variable.value)]


class ReplicaCopies(keras.callbacks.Callback):
    """After every train batch, records whether each variable's per-replica
    copies are bitwise identical, and keeps a snapshot of replica copies."""

    def __init__(self, strategy, variables):
        super().__init__()
        self.strategy = strategy
        self.variables = list(variables)
        self.mismatches = []
        self.snapshots = []  # per step: [per variable: [per replica array]]
        self.loss_scales = []
        self.iterations = []

    def on_train_batch_end(self, batch, logs=None):
        n = self.strategy.num_replicas_in_sync
        step = []
        for v in self.variables:
            copies = local_values(self.strategy, v)
            if len(copies) != n:
                self.mismatches.append((batch, v.path, f"{len(copies)} copies"))
            elif any(c.tobytes() != copies[0].tobytes() for c in copies[1:]):
                diff = max(float(np.nanmax(np.abs(c - copies[0]))) for c in copies[1:])
                self.mismatches.append((batch, v.path, f"max diff {diff}"))
            step.append(copies)
        self.snapshots.append(step)
        opt = self.model.optimizer
        if hasattr(opt, "dynamic_scale"):
            self.loss_scales.append(float(opt.dynamic_scale.numpy()))
        self.iterations.append(int(opt.iterations.numpy()))


def assert_replicas_identical(callback, steps):
    assert len(callback.snapshots) == steps, "on_train_batch_end not called every step"
    assert callback.variables, "no variables checked"
    assert not callback.mismatches, f"replica copies differ: {callback.mismatches}"


def assert_weights_close(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL, err_msg=f"{what} #{i}")


def fit_distributed(kind, n, x, y, sync, init, bn=False, batch=GLOBAL_BATCH):
    """Builds the inner model and the wrapper and compiles inside the
    strategy scope, fits one epoch; returns (model, inner, history, callback)."""
    strategy = mirrored(n)
    with strategy.scope():
        inner = make_inner(bn)
        set_trainable(inner, init)
        model = wrap(kind, inner, sync)
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    callback = ReplicaCopies(strategy, inner.variables)
    history = model.fit(
        dataset(x, y, batch), epochs=1, verbose=0, shuffle=False, callbacks=[callback]
    )
    return model, inner, history, callback


# --------------------------------------------------------------------------
# 1 + 3 + 5. Default mode: per-replica perturbation (m-sharpness).


def _flat_dot(a, b):
    return sum(
        float(np.sum(np.asarray(x, np.float64) * np.asarray(y, np.float64))) for x, y in zip(a, b)
    )


def reference_per_replica(kind, init, x, y, n, combine="per_replica"):
    """One-device reference, written independently of keras_sam.

    For each global batch: cut it into `n` contiguous shards (replica r gets
    the r-th slice); per shard, g at w, move the variables IN PLACE to
    w + rho g/||g||, g_p there on the same shard, restore the saved copy;
    SAM: d_r = g_p; GSAM: d_r = g_p - alpha g_perp. Apply plain SGD with the
    mean of d_r. `combine="global_gsam"` instead builds GSAM's d from the
    replica-averaged g and g_p (a wrong variant, used to show the test can tell
    them apart).

    Returns (final weights, stats): stats are what keras_sam logs for the
    epoch, computed here: `loss` the clean loss of the global batch,
    `grad_norm` the mean over replicas of ||g_r||, `sharpness` the mean over
    replicas of L_r(w + e_r) - L_r(w), each averaged over the steps.
    """
    model = make_inner()
    set_trainable(model, init)
    variables = model.trainable_variables
    mse = keras.losses.MeanSquaredError()

    def loss_and_grad(xs, ys):
        with tf.GradientTape() as tape:
            loss = mse(ys, model(xs, training=True))
        return float(loss), [g.numpy() for g in tape.gradient(loss, variables)]

    logged = dict(loss=[], grad_norm=[], sharpness=[])
    for start in range(0, len(x), GLOBAL_BATCH):
        xb, yb = x[start : start + GLOBAL_BATCH], y[start : start + GLOBAL_BATCH]
        size = len(xb) // n
        ds, gs, gps, losses, norms, sharpness = [], [], [], [], [], []
        for r in range(n):
            xs, ys = xb[r * size : (r + 1) * size], yb[r * size : (r + 1) * size]
            loss, g = loss_and_grad(xs, ys)
            saved = [np.array(v.numpy()) for v in variables]
            norm = np.sqrt(_flat_dot(g, g))
            for v, gi in zip(variables, g):
                v.assign(v.numpy() + (RHO / norm) * gi)
            loss_adv, gp = loss_and_grad(xs, ys)
            for v, s in zip(variables, saved):
                v.assign(s)
            if kind == "sam":
                d = gp
            else:
                coef = _flat_dot(g, gp) / _flat_dot(gp, gp)
                d = [p - ALPHA * (gi - coef * p) for gi, p in zip(g, gp)]
            ds.append(d)
            gs.append(g)
            gps.append(gp)
            losses.append(loss)
            norms.append(norm)
            sharpness.append(loss_adv - loss)
        if combine == "per_replica":
            descent = [np.mean(parts, axis=0) for parts in zip(*ds)]
        else:
            g = [np.mean(parts, axis=0) for parts in zip(*gs)]
            gp = [np.mean(parts, axis=0) for parts in zip(*gps)]
            coef = _flat_dot(g, gp) / _flat_dot(gp, gp)
            descent = [p - ALPHA * (gi - coef * p) for gi, p in zip(g, gp)]
        for v, d in zip(variables, descent):
            v.assign(v.numpy() - LR * d)
        logged["loss"].append(np.mean(losses))  # equal shards: the global mean
        logged["grad_norm"].append(np.mean(norms))
        logged["sharpness"].append(np.mean(sharpness))
    return numpy_values(variables), {k: float(np.mean(v)) for k, v in logged.items()}


def assert_logged(history, expected, rtol=1e-5, atol=1e-6):
    for key, value in expected.items():
        np.testing.assert_allclose(
            history.history[key][0], value, rtol=rtol, atol=atol, err_msg=key
        )


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("kind", ["sam", "gsam"])
def test_default_mode_perturbs_per_replica(kind, n):
    x, y = make_data()
    init = initial_values(make_inner())
    expected, logged = reference_per_replica(kind, init, x, y, n)

    # The reference is sensitive to how the replicas are combined: the
    # one-device (global) perturbation, and for GSAM the combination of
    # averaged gradients, end measurably elsewhere.
    wrong = [reference_per_replica(kind, init, x, y, 1)[0]]
    if kind == "gsam":
        wrong.append(reference_per_replica(kind, init, x, y, n, "global_gsam")[0])
    for w in wrong:
        gap = max(float(np.max(np.abs(a - b))) for a, b in zip(w, expected))
        assert gap > 20 * ATOL, gap

    model, inner, history, callback = fit_distributed(kind, n, x, y, False, init)

    assert_weights_close(numpy_values(inner.trainable_variables), expected, "weight")
    assert_replicas_identical(callback, STEPS)
    # 5: the logged loss is the clean loss of the global batch; grad_norm
    # and sharpness are the replicas' own.
    assert_logged(history, logged)
    assert int(model.optimizer.iterations.numpy()) == STEPS


# --------------------------------------------------------------------------
# 2 + 3 + 5. sync_perturbation=True with synchronized BatchNorm.

_single_device_runs = {}


def single_device_run(kind):
    """The same wrapper with synchronized BN on one device, no strategy."""
    if kind not in _single_device_runs:
        x, y = make_data()
        inner = make_inner(bn=True)
        init = initial_values(inner)
        set_trainable(inner, init)
        model = wrap(kind, inner, True)
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
        history = model.fit(dataset(x, y), epochs=1, verbose=0, shuffle=False)
        _single_device_runs[kind] = dict(
            init=init,
            trainable=numpy_values(inner.trainable_variables),
            non_trainable=numpy_values(inner.non_trainable_variables),
            history=history.history,
        )
    return _single_device_runs[kind]


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("kind", ["sam", "gsam"])
def test_sync_perturbation_matches_single_device(kind, n):
    ref = single_device_run(kind)
    x, y = make_data()
    # The BN moving statistics must have moved, so their comparison means something.
    assert not np.allclose(ref["non_trainable"][0], 0.0)

    model, inner, history, callback = fit_distributed(kind, n, x, y, True, ref["init"], bn=True)

    assert len(inner.non_trainable_variables) == 2
    assert_weights_close(numpy_values(inner.trainable_variables), ref["trainable"], "weight")
    assert_weights_close(
        numpy_values(inner.non_trainable_variables), ref["non_trainable"], "BN stat"
    )
    assert_replicas_identical(callback, STEPS)  # trainable AND BN statistics
    for key in ("loss", "grad_norm", "sharpness"):
        np.testing.assert_allclose(
            history.history[key][0],
            ref["history"][key][0],
            rtol=1e-5,
            atol=1e-6,
            err_msg=key,
        )


# --------------------------------------------------------------------------
# 4. Mixed precision.


@contextlib.contextmanager
def mixed_policy():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def mixed_float16():
    with mixed_policy():
        yield


@pytest.mark.parametrize("kind,sync", [("sam", False), ("gsam", True)])
def test_mixed_precision_scales_both_losses(kind, sync):
    """Finite data, 2 replicas, mixed_float16: compile wraps the optimizer in
    a LossScaleOptimizer; the update and the logged grad_norm match the float32
    reference (an unscaled perturbed loss would shrink the update by the loss
    scale 2**15, an unscaled clean loss would shrink grad_norm by it), and the
    loss scale stays as Keras keeps it on finite steps."""
    x, y = make_data()
    init = initial_values(make_inner())
    # sync_perturbation=True does not depend on the replica count: its
    # reference is the one-shard (global) one.
    expected, logged = reference_per_replica(kind, init, x, y, 1 if sync else 2)

    with mixed_policy():
        model, inner, history, callback = fit_distributed(kind, 2, x, y, sync, init)

    opt = model.optimizer
    assert isinstance(opt, keras.optimizers.LossScaleOptimizer)
    assert inner.layers[0].compute_dtype == "float16"
    w16 = numpy_values(inner.trainable_variables)
    assert all(np.all(np.isfinite(w)) for w in w16)
    for a, e, w0 in zip(w16, expected, init):
        # float16 forward passes: compare the updates to ~1%.
        np.testing.assert_allclose(a - w0, e - w0, rtol=2e-2, atol=2e-3)
    assert max(float(np.max(np.abs(e - w0))) for e, w0 in zip(expected, init)) > 1e-2
    assert_logged(history, logged, rtol=2e-2, atol=1e-3)
    initial = float(opt.initial_scale)
    assert callback.loss_scales == [initial] * STEPS
    assert callback.iterations == list(range(1, STEPS + 1))
    assert_replicas_identical(callback, STEPS)


def poisoned_data():
    """Two global batches of 8 for 2 replicas: the first finite, the second
    with one input of 1e5 (inf in float16) in its second half only, i.e. on
    replica 1's shard."""
    x, y = make_data(16)
    x[12, 2] = 1e5
    return x, y


def fit_poisoned(build):
    """Runs 2 replicas on `poisoned_data` under mixed_float16 with
    `build(inner) -> model` (called in the scope); returns the model, the
    initial weights and the callback."""
    x, y = poisoned_data()
    strategy = mirrored(2)
    init = initial_values(make_inner())
    with strategy.scope():
        inner = make_inner()
        set_trainable(inner, init)
        model = build(inner)
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    callback = ReplicaCopies(strategy, inner.trainable_variables)
    model.fit(dataset(x, y, 8), epochs=1, verbose=0, shuffle=False, callbacks=[callback])
    return model, init, callback


def nonfinite_step_outcome(callback):
    after_finite, after_poisoned = callback.snapshots
    finite = all(np.all(np.isfinite(c)) for v in after_poisoned for c in v)
    unchanged = all(
        a.tobytes() == b.tobytes()
        for va, vb in zip(after_finite, after_poisoned)
        for a, b in zip(va, vb)
    )
    return finite, unchanged


@pytest.mark.parametrize("kind,sync", [("sam", False), ("sam", True), ("gsam", False)])
def test_nonfinite_on_one_replica_skips_step_everywhere(mixed_float16, kind, sync):
    """Replica 1's gradients are non-finite, replica 0's finite. With
    sync_perturbation=True the all-reduced g carries the inf to every replica
    anyway; the per-replica modes are the ones that need the library's
    all-reduce before LossScaleOptimizer.apply."""
    model, init, callback = fit_poisoned(lambda inner: wrap(kind, inner, sync))
    after_finite = callback.snapshots[0]
    # The first (finite) step moved the weights.
    assert any(not np.array_equal(c[0], w) for c, w in zip(after_finite, init))
    finite, unchanged = nonfinite_step_outcome(callback)
    assert finite, "weights went non-finite"
    assert unchanged, "the non-finite step changed the weights"
    initial = float(model.optimizer.initial_scale)
    assert callback.loss_scales == [initial, initial / 2]
    assert callback.iterations == [1, 1]  # the skipped step is not counted
    assert_replicas_identical(callback, 2)


def test_keras_bug_loss_scale_optimizer_checks_only_replica_0(mixed_float16):
    """Documents the Keras bug the library works around (not a keras_sam
    test): a plain keras.Model, same data, same strategy, takes the step with
    replica 1's non-finite gradients (LossScaleOptimizer._tf_apply takes
    `finite` from replica 0 only) and ends with non-finite weights, and the
    loss scale is not reduced. If this starts failing, Keras fixed it."""
    model, _, callback = fit_poisoned(lambda inner: inner)
    finite, unchanged = nonfinite_step_outcome(callback)
    assert not (finite and unchanged)
    assert not finite
    initial = float(model.optimizer.initial_scale)
    assert callback.loss_scales == [initial, initial]


def test_without_the_workaround_sam_breaks_too(mixed_float16, monkeypatch):
    """Counterfactual: with `keras_sam.models._replicas.apply` reduced to a
    plain `optimizer.apply` (the all-reduce workaround taken out), the
    scenario of the test above ends with non-finite weights, so that test
    detects the workaround's removal."""
    from keras_sam.models import _replicas

    monkeypatch.setattr(
        _replicas,
        "apply",
        lambda optimizer, descent, variables: optimizer.apply(descent, variables),
    )
    _, _, callback = fit_poisoned(lambda inner: wrap("sam", inner, False))
    finite, unchanged = nonfinite_step_outcome(callback)
    assert not (finite and unchanged)


# --------------------------------------------------------------------------
# 6. Models people bring: an Embedding (IndexedSlices gradients), and
#    BatchNorm statistics on a skipped mixed-precision step.


def text_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(20, 4),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(OUT_DIM),
        ]
    )


def text_data(n=GLOBAL_BATCH * STEPS):
    rng = np.random.default_rng(3)
    return rng.integers(0, 20, size=(n, 6)).astype("int32"), rng.normal(size=(n, OUT_DIM)).astype(
        "float32"
    )


def fit_text(kind, strategy, x, y, sync=True):
    with strategy.scope() if strategy else contextlib.nullcontext():
        inner = text_model()
        model = wrap(kind, inner, sync)
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    history = model.fit(dataset(x, y), epochs=1, verbose=0, shuffle=False)
    return model, inner, history


@pytest.mark.parametrize("kind", ["sam", "gsam"])
def test_embedding_under_mirrored_strategy_equals_one_device(kind):
    """TF's gradient of an Embedding is tf.IndexedSlices; with the all-reduced
    perturbation 2 replicas give the one-device weights."""
    x, y = text_data()
    _, single, h1 = fit_text(kind, None, x, y)
    _, multi, h2 = fit_text(kind, mirrored(2), x, y)
    assert_weights_close(
        numpy_values(multi.trainable_variables),
        numpy_values(single.trainable_variables),
        "embedding model",
    )
    np.testing.assert_allclose(h2.history["loss"], h1.history["loss"], rtol=1e-5)


def test_embedding_under_mixed_float16_matches_float32():
    x, y = text_data()
    _, reference, _ = fit_text("sam", None, x, y)
    with mixed_policy():
        model, inner, _ = fit_text("sam", None, x, y)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    init = numpy_values(text_model().trainable_variables)
    for a, e, w0 in zip(
        numpy_values(inner.trainable_variables), numpy_values(reference.trainable_variables), init
    ):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a - w0, e - w0, rtol=2e-2, atol=2e-3)


class StateSnapshots(keras.callbacks.Callback):
    def __init__(self, variables):
        super().__init__()
        self.variables, self.snapshots = list(variables), []

    def on_train_batch_end(self, batch, logs=None):
        self.snapshots.append([np.array(v.numpy()) for v in self.variables])


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("kind", ["sam", "gsam"])
def test_skipped_mixed_precision_step_changes_no_state(mixed_float16, kind, replicas):
    """The second batch overflows float16: the step is skipped and then the
    weights AND the BatchNorm moving statistics stay as they were."""
    x, y = poisoned_data()
    strategy = mirrored(replicas)
    with strategy.scope():
        inner = make_inner(bn=True)
        model = wrap(kind, inner, False)
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    callback = StateSnapshots(inner.variables)
    model.fit(dataset(x, y, 8), epochs=1, verbose=0, shuffle=False, callbacks=[callback])
    after_finite, after_skipped = callback.snapshots
    assert any("moving" in v.path for v in inner.non_trainable_variables)
    for v, a, b in zip(inner.variables, after_finite, after_skipped):
        assert a.tobytes() == b.tobytes(), f"{v.path} changed on a skipped step"
        assert np.all(np.isfinite(b)), v.path
    assert int(model.optimizer.iterations.numpy()) == 1


def test_sync_perturbation_with_sub_batches_of_unknown_size_asks_for_drop_remainder():
    strategy = mirrored(2)
    x, y = make_data()
    with strategy.scope():
        model = keras_sam.SAMModel(
            make_inner(), rho=RHO, sync_perturbation=True, num_batch_splits=2
        )
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    with pytest.raises(ValueError, match="drop_remainder"):
        model.fit(dataset(x, y), epochs=1, verbose=0)
