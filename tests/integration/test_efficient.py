"""Cheaper schedules of SAM's second gradient: `sam_every`, LookSAM, AE-SAM.

Each is checked against a reference composed by hand in the test:
`sam_every=k` against one keras_sam SAM step followed by k-1 plain Keras
steps on the same model; LookSAM's reuse step against its formula in float64
NumPy; AE-SAM's decisions against the moving moments recomputed in NumPy.
State kept across steps must survive `model.save` and `BackupAndRestore`.
(Other backends, jit and steps_per_execution: tests/backends/test_backends.py.)
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from strategies import mirrored
from wrappers import wrap

import keras_sam
from keras_sam.models import host_steps

D, BATCH, LR = 5, 8, 0.1


def own_state(model):
    """The wrapper's named state variables, in the order they were made."""
    return keras.tree.flatten(list(model.state_variables().values()))


def make_inner(seed=0, bn=True):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((D,)), keras.layers.Dense(6, activation="tanh")]
    if bn:
        layers.append(keras.layers.BatchNormalization(momentum=0.8))
    return keras.Sequential(layers + [keras.layers.Dense(2)])


def make_data(steps, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(steps * BATCH, D)).astype("float32")
    y = rng.normal(size=(steps * BATCH, 2)).astype("float32")
    return x, y


def batches(x, y):
    return [(x[s : s + BATCH], y[s : s + BATCH]) for s in range(0, len(x), BATCH)]


def dataset(x, y):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)


def compiled(model, **kwargs):
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", **kwargs)
    return model


def assert_same_variables(a, b, rtol=1e-5, atol=1e-6):
    assert len(a.variables) == len(b.variables)
    for va, vb in zip(a.variables, b.variables):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), rtol=rtol, atol=atol, err_msg=va.path)


# ------------------------------------------------------------------ sam_every
@pytest.mark.parametrize("cls", [keras_sam.SAMModel, keras_sam.GSAMModel])
@pytest.mark.parametrize("k", [2, 3])
def test_sam_every_k_is_a_sam_step_then_k_minus_1_plain_keras_steps(cls, k):
    x, y = make_data(steps=2 * k + 1)
    model = compiled(cls(make_inner(), rho=0.1, sam_every=k))
    history = model.fit(dataset(x, y), epochs=1, verbose=0, shuffle=False)

    reference = make_inner()
    sam = compiled(cls(reference, rho=0.1))  # sam_every=1, tested against references
    plain = compiled(reference)
    for i, (xb, yb) in enumerate(batches(x, y)):
        (sam if i % k == 0 else plain).train_on_batch(xb, yb)
    # BatchNorm statistics included: they moved once per step in both kinds.
    assert_same_variables(model.inner, reference)
    sam_steps = len(range(0, 2 * k + 1, k))
    np.testing.assert_allclose(
        history.history["sam_fraction"][0], sam_steps / (2 * k + 1), rtol=1e-6
    )


def test_sam_every_one_is_todays_step_and_logs_no_fraction():
    x, y = make_data(steps=3)
    a = compiled(keras_sam.SAMModel(make_inner(), rho=0.1))
    b = compiled(keras_sam.SAMModel(make_inner(), rho=0.1, sam_every=1))
    ha = a.fit(dataset(x, y), epochs=1, verbose=0)
    hb = b.fit(dataset(x, y), epochs=1, verbose=0)
    assert "sam_fraction" not in hb.history
    assert_same_variables(a, b, rtol=0, atol=0)
    assert ha.history == hb.history


def test_plain_steps_log_sharpness_and_rho_of_sam_steps_only():
    x, y = make_data(steps=4)
    model = compiled(keras_sam.GSAMModel(make_inner(), rho=0.1, sam_every=2))
    history = model.fit(dataset(x, y), epochs=1, verbose=0)
    np.testing.assert_allclose(history.history["rho"][0], 0.1, rtol=1e-6)
    assert history.history["sharpness"][0] != 0.0


# -------------------------------------------------------------------- LookSAM
def _grads(model, xb, yb, weights):
    """float64 gradient of the MSE at `weights` (a model without BN)."""
    for v, w in zip(model.trainable_variables, weights):
        v.assign(w.astype("float32"))
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(yb, model(xb, training=True))
    return [g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_variables)]


def _norm(xs):
    return np.sqrt(sum(np.sum(t * t) for t in xs))


def _sam_gradient(model, xb, yb, w, rho, replicas=1):
    """float64 SAM descent gradient, each of `replicas` equal slices of the
    batch perturbed along its own gradient, averaged (m-sharpness: what
    replicas that do not synchronize the perturbation sum up)."""
    parts = []
    for xs, ys in zip(np.split(xb, replicas), np.split(yb, replicas)):
        g = _grads(model, xs, ys, w)
        parts.append(_grads(model, xs, ys, [a + rho * b / _norm(g) for a, b in zip(w, g)]))
    return [np.mean(p, axis=0) for p in zip(*parts)]


def looksam_reference(x, y, rho, k, alpha, replicas=1):
    model = make_inner(bn=False)
    w = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    g_v = None
    for i, (xb, yb) in enumerate(batches(x, y)):
        g = _grads(model, xb, yb, w)
        if i % k == 0:
            gp = _sam_gradient(model, xb, yb, w, rho, replicas)
            coef = sum(np.sum(a * b) for a, b in zip(gp, g)) / _norm(g) ** 2
            g_v = [b - coef * a for a, b in zip(g, gp)]
            d = gp
        else:
            d = [a + alpha * _norm(g) / _norm(g_v) * b for a, b in zip(g, g_v)]
        w = [a - LR * b for a, b in zip(w, d)]
    return w, g_v


@pytest.mark.parametrize("k", [1, 3])
def test_looksam_matches_its_formula(k):
    x, y = make_data(steps=5)
    model = compiled(keras_sam.LookSAMModel(make_inner(bn=False), rho=0.2, sam_every=k, alpha=0.7))
    model.fit(dataset(x, y), epochs=1, verbose=0, shuffle=False)
    w, g_v = looksam_reference(x, y, rho=0.2, k=k, alpha=0.7)
    for v, ref in zip(model.inner.trainable_variables, w):
        np.testing.assert_allclose(v.numpy(), ref, rtol=1e-5, atol=1e-6)
    for v, ref in zip(own_state(model), g_v):
        np.testing.assert_allclose(v.numpy(), ref, rtol=1e-4, atol=1e-6)


def test_looksam_every_step_is_sam():
    x, y = make_data(steps=3)
    a = compiled(keras_sam.LookSAMModel(make_inner(), rho=0.1, sam_every=1))
    b = compiled(keras_sam.SAMModel(make_inner(), rho=0.1))
    a.fit(dataset(x, y), epochs=1, verbose=0)
    b.fit(dataset(x, y), epochs=1, verbose=0)
    assert_same_variables(a.inner, b.inner, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------- AE-SAM
def test_aesam_decides_by_the_moving_moments_of_the_squared_gradient_norm():
    """AE-SAM's decisions and moments against NumPy, with steps replayed by
    a SAM or a plain Keras step on a reference model as the policy says."""
    x, y = make_data(steps=8)
    threshold, decay = 0.3, 0.5
    model = compiled(
        keras_sam.AESAMModel(make_inner(bn=False), rho=0.1, threshold=threshold, decay=decay)
    )
    history = model.fit(dataset(x, y), epochs=1, verbose=0, shuffle=False)

    reference = make_inner(bn=False)
    sam, plain = compiled(keras_sam.SAMModel(reference, rho=0.1)), compiled(reference)
    mean = variance = 0.0
    decisions = []
    for xb, yb in batches(x, y):
        w = [v.numpy().astype(np.float64) for v in reference.trainable_variables]
        s = _norm(_grads(make_inner(bn=False), xb, yb, w)) ** 2
        mean = decay * mean + (1 - decay) * s
        variance = decay * variance + (1 - decay) * (s - mean) ** 2
        decisions.append(s >= mean + threshold * np.sqrt(variance))
        (sam if decisions[-1] else plain).train_on_batch(xb, yb)
    assert 0 < sum(decisions) < len(decisions), decisions  # both kinds occur
    np.testing.assert_allclose(history.history["sam_fraction"][0], np.mean(decisions), rtol=1e-6)
    assert_same_variables(model.inner, reference)
    np.testing.assert_allclose([v.numpy() for v in own_state(model)], [mean, variance], rtol=1e-4)


def aesam_reference(x, y, rho, threshold, decay, replicas=1):
    """float64 AE-SAM: the decision from the whole batch's gradient, a SAM
    step (`_sam_gradient`) or a plain one. Returns weights, decisions, moments."""
    model = make_inner(bn=False)
    w = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    mean = variance = 0.0
    decisions = []
    for xb, yb in batches(x, y):
        g = _grads(model, xb, yb, w)
        s = _norm(g) ** 2
        mean = decay * mean + (1 - decay) * s
        variance = decay * variance + (1 - decay) * (s - mean) ** 2
        decisions.append(s >= mean + threshold * np.sqrt(variance))
        d = _sam_gradient(model, xb, yb, w, rho, replicas) if decisions[-1] else g
        w = [a - LR * b for a, b in zip(w, d)]
    return w, decisions, [mean, variance]


def test_aesam_threshold_moves_linearly_over_total_steps():
    model = keras_sam.AESAMModel(make_inner(), threshold=-1.0, threshold_end=1.0, total_steps=10)
    assert model.get_config()["threshold_end"] == 1.0
    with pytest.raises(ValueError, match="threshold_end"):
        keras_sam.AESAMModel(make_inner(), threshold_end=1.0)
    with pytest.raises(ValueError, match="decay"):
        keras_sam.AESAMModel(make_inner(), decay=1.0)
    with pytest.raises(ValueError, match="sam_every"):
        keras_sam.AESAMModel(make_inner(), sam_every=3)


@pytest.mark.parametrize("cls", [keras_sam.LookSAMModel, keras_sam.AESAMModel])
def test_sub_batches_are_refused(cls):
    with pytest.raises(ValueError, match="num_batch_splits"):
        cls(make_inner(), num_batch_splits=2)


@pytest.mark.parametrize("kwargs", [dict(sam_every=0), dict(sam_every=1.0), dict(sam_every="5")])
def test_bad_sam_every(kwargs):
    with pytest.raises(ValueError, match="sam_every"):
        keras_sam.SAMModel(make_inner(), **kwargs)


# ------------------------------------------------- state across save / resume
SCHEDULED = ["gsam", "looksam", "aesam"]
"""Methods with plain steps between SAM steps (GSAM every 3rd step)."""


def scheduled(name, inner):
    return wrap(name, inner, **({"sam_every": 3} if name == "gsam" else {}))


@pytest.mark.parametrize("name", SCHEDULED)
def test_save_load_continues_like_an_uninterrupted_run(tmp_path, name):
    x, y = make_data(steps=8)
    first, second = (x[: 4 * BATCH], y[: 4 * BATCH]), (x[4 * BATCH :], y[4 * BATCH :])
    whole = compiled(scheduled(name, make_inner()))
    whole.fit(dataset(*first), epochs=1, verbose=0, shuffle=False)
    whole.fit(dataset(*second), epochs=1, verbose=0, shuffle=False)

    part = compiled(scheduled(name, make_inner()))
    part.fit(dataset(*first), epochs=1, verbose=0, shuffle=False)
    part.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded) is type(part)
    own = {k: v for k, v in part.get_config().items() if k != "model"}
    assert {k: loaded.get_config()[k] for k in own} == own
    assert_same_variables(loaded, part, rtol=0, atol=0)  # own state included
    loaded.fit(dataset(*second), epochs=1, verbose=0, shuffle=False)
    assert_same_variables(loaded, whole)


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("interrupted")


@pytest.mark.parametrize("name", ["looksam", "aesam"])
def test_backup_and_restore_resumes_like_an_uninterrupted_run(tmp_path, name):
    x, y = make_data(steps=4)
    whole = compiled(scheduled(name, make_inner()))
    whole.fit(dataset(x, y), epochs=4, verbose=0, shuffle=False)

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    run = compiled(scheduled(name, make_inner()))
    with pytest.raises(RuntimeError, match="interrupted"):
        run.fit(dataset(x, y), epochs=4, verbose=0, shuffle=False, callbacks=[backup, _Interrupt()])
    resumed = compiled(scheduled(name, make_inner(seed=5)))  # other weights: all restored
    resumed.fit(dataset(x, y), epochs=4, verbose=0, shuffle=False, callbacks=[backup])
    assert_same_variables(resumed, whole)
    assert any(np.any(v.numpy() != 0) for v in own_state(resumed))


# ------------------------------------------------------ several replicas agree
@pytest.mark.parametrize("name", SCHEDULED)
def test_every_replica_takes_the_same_kind_of_step(name):
    """With the all-reduced perturbation and no BatchNorm, 2 replicas give the
    one-device weights, which they cannot if any replica chose differently;
    the replicas' copies stay identical."""
    x, y = make_data(steps=6)

    def run(strategy):
        with strategy.scope():
            inner = make_inner(bn=False)
            model = scheduled(name, inner)
            model.sync_perturbation = True
            compiled(model)
        history = model.fit(dataset(x, y), epochs=1, verbose=0, shuffle=False)
        return model, history

    single, h1 = run(tf.distribute.get_strategy())
    strategy = mirrored(2)
    multi, h2 = run(strategy)
    assert_same_variables(multi, single)
    if "sam_fraction" in h1.history:
        assert h1.history["sam_fraction"] == h2.history["sam_fraction"]
    for v in multi.variables:
        copies = [t.numpy() for t in strategy.experimental_local_results(v.value)]
        assert all(c.tobytes() == copies[0].tobytes() for c in copies[1:]), v.path


def test_looksam_after_freezing_a_layer_keeps_the_other_directions():
    """Fine-tuning habit: freeze a layer after wrapping. The frozen kernel's
    stored direction stays put, the others pair with their own variables."""
    x, y = make_data(steps=4)
    inner = make_inner(bn=False)
    model = keras_sam.LookSAMModel(inner, rho=0.1, sam_every=2)
    inner.layers[0].trainable = False
    frozen = [v.numpy().copy() for v in inner.layers[0].weights]
    compiled(model).fit(dataset(x, y), epochs=1, verbose=0)
    for v, w in zip(inner.layers[0].weights, frozen):
        np.testing.assert_array_equal(v.numpy(), w)
    slots = own_state(model)
    assert [s.shape for s in slots] == [v.shape for v in model.trainable_variables]
    assert all(np.any(s.numpy() != 0) for s in slots)


@pytest.mark.parametrize("name", ["looksam", "aesam"])
def test_replicas_perturbing_apart_match_the_float64_reference(name):
    """2 replicas, `sync_perturbation=False`: each perturbs along its own half
    of the batch, while LookSAM's direction and reuse step and AE-SAM's
    decision use the global clean gradient, all-reduced once per step."""
    x, y = make_data(steps=6)
    with mirrored(2).scope():
        if name == "looksam":
            model = keras_sam.LookSAMModel(make_inner(bn=False), rho=0.2, sam_every=3, alpha=0.7)
        else:
            model = keras_sam.AESAMModel(make_inner(bn=False), rho=0.2, threshold=0.3, decay=0.5)
        compiled(model)
    history = model.fit(dataset(x, y), epochs=1, verbose=0, shuffle=False)
    if name == "looksam":
        w, own = looksam_reference(x, y, rho=0.2, k=3, alpha=0.7, replicas=2)
    else:
        w, decisions, own = aesam_reference(x, y, rho=0.2, threshold=0.3, decay=0.5, replicas=2)
        assert 0 < sum(decisions) < len(decisions), decisions  # both kinds occur
        np.testing.assert_allclose(
            history.history["sam_fraction"][0], np.mean(decisions), rtol=1e-6
        )
    for v, ref in zip(model.inner.trainable_variables, w):
        np.testing.assert_allclose(v.numpy(), ref, rtol=1e-6, atol=1e-6, err_msg=v.path)
    for v, ref in zip(own_state(model), own):
        np.testing.assert_allclose(v.numpy(), ref, rtol=1e-4, atol=1e-6, err_msg=v.path)


def collective_reductions(model, kind=host_steps.IN_STEP):
    """All-reduce ops in `model.train_step` traced under its strategy for
    one kind of step (by default the step that chooses inside, so both
    kinds' collectives): every replica's copy, inside conditionals (library
    functions) too."""
    model._chooser.clock.kind = kind
    strategy = model.distribute_strategy
    step = tf.function(lambda x, y: strategy.run(model.train_step, args=((x, y),)))
    graph = step.get_concrete_function(
        tf.TensorSpec((BATCH // 2, D)), tf.TensorSpec((BATCH // 2, 2))
    ).graph.as_graph_def()
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    return sum("CollectiveReduce" in n.op or "AllReduce" in n.op for n in nodes)


REDUCING = {
    "sam": lambda m: keras_sam.SAMModel(m, rho=0.1),
    "gsam": lambda m: keras_sam.GSAMModel(m, rho=0.1),
    "looksam": lambda m: keras_sam.LookSAMModel(m, rho=0.1, sam_every=3),
    "aesam": lambda m: keras_sam.AESAMModel(m, rho=0.1, threshold=0.0),
}


@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize("name", list(REDUCING))
def test_the_clean_gradient_is_all_reduced_at_most_once_per_step(name, sync):
    """One collective per replica and `all_reduce` call (MirroredStrategy
    packs a call's list into one, as apply() does with every variable's
    gradient). Per replica: apply()'s sum of the descent; with
    `sync_perturbation` the clean gradient before perturbing, which is then
    the one every hook shares; GSAM's global `g_p` for its combination;
    LookSAM's `g` and `g_p` in one call (only `g_p` when `g` is the synced
    one), which the reuse step shares; AE-SAM's `g` for its decision unless
    synced. (Before sharing: LookSAM 4 and 5, AE-SAM 2 and 3.)"""
    x, y = make_data(steps=2)
    strategy = mirrored(2)
    with strategy.scope():
        model = REDUCING[name](make_inner(bn=False))
        model.sync_perturbation = sync
        compiled(model)
    model.fit(dataset(x, y), epochs=1, verbose=0)
    per_replica = (
        1
        + sync
        + {
            "sam": 0,
            "gsam": sync,
            "looksam": 1,
            "aesam": 1 - sync,
        }[name]
    )
    assert collective_reductions(model) == strategy.num_replicas_in_sync * per_replica
    if name == "looksam":  # the steps chosen on the host: no more than inside
        for kind in (host_steps.SAM, host_steps.BETWEEN):
            count = collective_reductions(model, kind)
            assert count <= strategy.num_replicas_in_sync * per_replica, kind
