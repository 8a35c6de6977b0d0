"""keras_sam on the models real projects train, on whichever backend runs it.

Backend-agnostic (keras.ops / NumPy; no TensorFlow import at module level):
the main pytest process runs it on its own backend and
tests/cross_backend/test_model_families_backends.py reruns it under KERAS_BACKEND=jax and
torch in subprocesses.

Families: (a) Embedding + LSTM text classifier, (b) a Transformer encoder
block, (c) a two-input / two-output functional model compiled with a loss
dict, loss_weights and per-output metrics, (d) a CNN with BatchNormalization
and Dropout, (e) keras.applications.MobileNet (alpha=0.25, 32x32, the
fastest application measured on all three backends; it runs with
run_eagerly=True because tracing its ~60 layers twice per SAM step cost ~6 s
per compile on TensorFlow against 0.7 s eagerly; graph / jit behaviour is
covered by the four small families).

Checks:
1. rho=0 is plain Keras: same weights and every History loss/metric key.
2. One step equals a hand-written SAM / ASAM / GSAM step whose gradients come
   from the backend's own autodiff over `model.stateless_call` (independent
   of keras_sam) and whose perturbation / combination is float64 NumPy.
3. The Keras habits around fit: LR callbacks moving GSAM's rho,
   ModelCheckpoint, BackupAndRestore, evaluate / validation logs, export,
   clone_model.
4. mixed_float16 with an Embedding (TensorFlow), a Python generator feeding
   the multi-output model.
"""

import json

import keras
import numpy as np
import pytest
from keras import ops
from keras import tree

import keras_sam

BACKEND = keras.backend.backend()
# Compile time dominates these tiny runs; XLA would only add to it.
JIT = False
LR = 0.1
VOCAB, SEQ, CLASSES = 50, 8, 3
N, BATCH = 8, 4  # 2 steps per epoch in check 1, one full-batch step in check 2
ADAPTIVE_UNSCALED = ("bias", "beta")  # official ASAM: everything but biases / BN offsets


# ------------------------------------------------------------------ families
@keras.saving.register_keras_serializable(package="test_model_families")
class AddPositions(keras.layers.Layer):
    """Learned positional embedding added to the token embeddings."""

    def build(self, input_shape):
        self.positions = self.add_weight(
            shape=tuple(input_shape[1:]), initializer="random_normal", name="positions"
        )

    def call(self, x):
        return x + ops.expand_dims(self.positions, 0)


def _text(seed):
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((SEQ,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, 8)(tokens)
    h = keras.layers.LSTM(8)(h)
    return keras.Model(tokens, keras.layers.Dense(CLASSES, activation="softmax")(h))


def _transformer(seed):
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((SEQ,), dtype="int32")
    h = AddPositions()(keras.layers.Embedding(VOCAB, 16)(tokens))
    a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)(h, h)
    h = keras.layers.LayerNormalization()(keras.layers.Add()([h, a]))
    f = keras.layers.Dense(16, activation="relu")(h)
    f = keras.layers.Dense(16)(f)
    h = keras.layers.LayerNormalization()(keras.layers.Add()([h, f]))
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, keras.layers.Dense(CLASSES, activation="softmax")(h))


def _multi_io(seed):
    keras.utils.set_random_seed(seed)
    num = keras.Input((6,), name="num")
    aux = keras.Input((4,), name="aux")
    h = keras.layers.Concatenate()([num, aux])
    h = keras.layers.Dense(16, activation="relu")(h)
    out_a = keras.layers.Dense(1, name="out_a")(h)
    out_b = keras.layers.Dense(CLASSES, activation="softmax", name="out_b")(h)
    return keras.Model({"num": num, "aux": aux}, [out_a, out_b])


def _cnn(seed):
    keras.utils.set_random_seed(seed)
    image = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same")(image)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.MaxPooling2D()(h)
    # Seeded: on torch an unseeded Dropout draws from torch's global RNG, so
    # not even two plain Keras runs from the same state agree.
    h = keras.layers.Dropout(0.25, seed=3)(h)
    h = keras.layers.Conv2D(8, 3, padding="same")(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(image, keras.layers.Dense(CLASSES, activation="softmax")(h))


def _application(seed):
    keras.utils.set_random_seed(seed)
    # dropout=0: its unseeded Dropout draws from torch's global RNG (see _cnn);
    # the seeded CNN covers Dropout.
    return keras.applications.MobileNet(
        input_shape=(32, 32, 3), alpha=0.25, weights=None, classes=CLASSES, dropout=0.0
    )


def _labels(rng, n):
    return rng.integers(0, CLASSES, size=(n,)).astype("int32")


def _token_data(rng, n):
    return rng.integers(0, VOCAB, size=(n, SEQ)).astype("int32"), _labels(rng, n)


def _multi_io_data(rng, n):
    x = {
        "num": rng.normal(size=(n, 6)).astype("float32"),
        "aux": rng.normal(size=(n, 4)).astype("float32"),
    }
    y = {
        "out_a": rng.normal(size=(n, 1)).astype("float32"),
        "out_b": _labels(rng, n),
    }
    return x, y


def _image_data(size):
    return lambda rng, n: (rng.normal(size=(n, size, size, 3)).astype("float32"), _labels(rng, n))


class Family:
    def __init__(
        self, build, data, loss, loss_weights=None, metrics=("accuracy",), run_eagerly=False
    ):
        self.build, self._data, self.run_eagerly = build, data, run_eagerly
        self.loss, self.loss_weights = loss, loss_weights
        self.metrics = list(metrics) if isinstance(metrics, tuple) else metrics

    def data(self, seed=1, n=N):
        return self._data(np.random.default_rng(seed), n)

    def compile_kwargs(self, optimizer=None):
        return dict(
            optimizer=optimizer or keras.optimizers.SGD(LR),
            loss=self.loss,
            loss_weights=self.loss_weights,
            metrics=self.metrics,
            jit_compile=JIT,
            run_eagerly=self.run_eagerly,
        )

    def hand_loss(self, y, y_pred):
        """The training loss written out, independently of compile."""
        if isinstance(self.loss, dict):
            names = list(self.loss)  # output order of the model
            total = 0.0
            for name, pred in zip(names, y_pred):
                fn = keras.losses.get(self.loss[name])
                total = total + self.loss_weights[name] * ops.mean(fn(y[name], pred))
            return total
        return ops.mean(keras.losses.get(self.loss)(y, y_pred))


FAMILIES = {
    "text_lstm": Family(_text, _token_data, "sparse_categorical_crossentropy"),
    "transformer": Family(_transformer, _token_data, "sparse_categorical_crossentropy"),
    "multi_io": Family(
        _multi_io,
        _multi_io_data,
        {"out_a": "mse", "out_b": "sparse_categorical_crossentropy"},
        loss_weights={"out_a": 0.5, "out_b": 1.0},
        metrics={"out_a": ["mae"], "out_b": ["accuracy"]},
    ),
    "cnn_bn_dropout": Family(_cnn, _image_data(8), "sparse_categorical_crossentropy"),
    "mobilenet": Family(
        _application, _image_data(32), "sparse_categorical_crossentropy", run_eagerly=True
    ),
}

SAM_RHO, ASAM_RHO, ETA, GSAM_ALPHA = 0.05, 0.5, 0.01, 0.3
VARIANTS = {
    "sam": lambda inner, rho=SAM_RHO: keras_sam.SAMModel(inner, rho=rho),
    "asam": lambda inner, rho=ASAM_RHO: keras_sam.SAMModel(inner, rho=rho, adaptive=True, eta=ETA),
    "gsam": lambda inner, rho=SAM_RHO: keras_sam.GSAMModel(inner, rho=rho, alpha=GSAM_ALPHA),
}


# ------------------------------------------------------------------- helpers
def to_numpy(t):
    return np.asarray(ops.convert_to_numpy(t))


def values(variables):
    return [to_numpy(v) for v in variables]


def copy_state(src, dst):
    """All variables, including the dropout seed states get_weights skips."""
    assert len(src.variables) == len(dst.variables)
    for a, b in zip(src.variables, dst.variables):
        b.assign(a)


def twins(family, seed=0):
    """Two identical copies of a family's model (weights AND seed states)."""
    a, b = family.build(seed), family.build(seed)
    b.set_weights(a.get_weights())
    copy_state(a, b)
    return a, b


def assert_weights_close(got, want, rtol, atol, names=None):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(
            np.asarray(g, np.float64),
            np.asarray(w, np.float64),
            rtol=rtol,
            atol=atol,
            err_msg=names[i] if names else str(i),
        )


def assert_logs_equal(got, want, rtol=1e-6, atol=1e-7):
    """Every key plain Keras logs is logged with the same values."""
    missing = sorted(set(want) - set(got))
    assert not missing, f"keys missing: {missing}; got {sorted(got)}"
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=atol, err_msg=key)


def _tensors(structure):
    return tree.map_structure(ops.convert_to_tensor, structure)


def _loss_fn(model, family):
    def fn(tv, ntv, x, y):
        y_pred, new_ntv, losses = model.stateless_call(
            tv, ntv, x, training=True, return_losses=True
        )
        loss = family.hand_loss(y, y_pred)
        for extra in losses:
            loss = loss + extra
        return loss, new_ntv

    return fn


def loss_and_grad(model, family, tv, ntv, x, y):
    """Loss, float64 gradients and new non-trainable state of the training
    loss at trainable values `tv` and state `ntv` (NumPy), computed with the
    backend's own autodiff, independently of keras_sam."""
    fn = _loss_fn(model, family)
    ntv_t = [ops.convert_to_tensor(s) for s in ntv]
    x, y = _tensors(x), _tensors(y)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        tv_t = [tf.constant(w) for w in tv]
        with tf.GradientTape() as tape:
            tape.watch(tv_t)
            loss, new = fn(tv_t, ntv_t, x, y)
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, tv_t)]
    elif BACKEND == "jax":
        import jax

        grad_fn = jax.jit(jax.value_and_grad(fn, has_aux=True))
        (loss, new), grads = grad_fn([jax.numpy.asarray(w) for w in tv], ntv_t, x, y)
    elif BACKEND == "torch":
        import torch

        tv_t = [torch.tensor(w, requires_grad=True) for w in tv]
        loss, new = fn(tv_t, ntv_t, x, y)
        grads = torch.autograd.grad(loss, tv_t)
        loss, new = loss.detach(), [s.detach() for s in new]
    else:  # pragma: no cover
        pytest.skip(f"no gradient helper for backend {BACKEND}")
    return (
        float(to_numpy(loss)),
        [to_numpy(g).astype(np.float64) for g in grads],
        [to_numpy(s) for s in new],
    )


def _norm(xs):
    return np.sqrt(sum(float(np.sum(x * x)) for x in xs))


def hand_step(model, family, variant, x, y, lr=LR):
    """One SGD step of SAM / ASAM / GSAM written out; returns (weights, state)."""
    tv = values(model.trainable_variables)
    ntv = values(model.non_trainable_variables)
    _, g, new_state = loss_and_grad(model, family, tv, ntv, x, y)
    if variant == "asam":
        t = [
            np.abs(w.astype(np.float64)) + ETA if v.name not in ADAPTIVE_UNSCALED else 1.0
            for v, w in zip(model.trainable_variables, tv)
        ]
        tg = [ti * gi for ti, gi in zip(t, g)]
        e = [ASAM_RHO * ti * ti * gi / _norm(tg) for ti, gi in zip(t, g)]
    else:
        e = [SAM_RHO * gi / _norm(g) for gi in g]
    perturbed = [(w.astype(np.float64) + ei).astype(np.float32) for w, ei in zip(tv, e)]
    _, gp, _ = loss_and_grad(model, family, perturbed, ntv, x, y)  # SAME start state
    if variant == "gsam":
        coef = sum(np.sum(a * b) for a, b in zip(g, gp)) / _norm(gp) ** 2
        d = [b - GSAM_ALPHA * (a - coef * b) for a, b in zip(g, gp)]
    else:
        d = gp
    return [w.astype(np.float64) - lr * di for w, di in zip(tv, d)], new_state


def fit(model, family, x, y, epochs=1, batch_size=BATCH, **kwargs):
    return model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0, **kwargs)


SAM_KEYS = ("sharpness", "grad_norm", "rho")


# ------------------------------------------------ 1. rho=0 is plain Keras
_PLAIN = {}


def _plain_run(name):
    """Plain Keras on a family, 2 SGD steps; cached across the variants."""
    if name not in _PLAIN:
        family = FAMILIES[name]
        plain, start = twins(family)
        x, y = family.data()
        plain.compile(**family.compile_kwargs())
        history = fit(plain, family, x, y)
        _PLAIN[name] = (start, values(plain.variables), history.history)
    return _PLAIN[name]


# rho=0 makes every variant a plain step; SAM on every family, GSAM (whose
# combination runs even at rho=0) on the multi-output model.
@pytest.mark.parametrize(
    "name, variant", [(name, "sam") for name in FAMILIES] + [("multi_io", "gsam")]
)
def test_rho_zero_equals_plain_keras(name, variant):
    family = FAMILIES[name]
    start, plain_variables, plain_logs = _plain_run(name)
    inner = family.build(0)
    copy_state(start, inner)  # the plain run's exact starting point
    model = VARIANTS[variant](inner, rho=0.0)
    model.compile(**family.compile_kwargs())
    x, y = family.data()
    history = fit(model, family, x, y)
    assert_weights_close(
        values(inner.variables),
        plain_variables,
        rtol=1e-6,
        atol=1e-6,
        names=[v.path for v in inner.variables],
    )
    assert_logs_equal(history.history, plain_logs)


# ------------------------------------------- 2. one step equals a hand step
# The keras.applications model is float32-ill-conditioned for a one-step
# comparison (one ulp of a weight moves the step by ~1e-4); it is covered by
# the rho=0 check above.
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "mobilenet"])
def test_one_step_equals_hand_written_step(name, variant):
    family = FAMILIES[name]
    inner = family.build(0)
    x, y = family.data()
    want_weights, want_state = hand_step(inner, family, variant, x, y)
    model = VARIANTS[variant](inner)
    model.compile(**family.compile_kwargs())
    fit(model, family, x, y, batch_size=N)  # one full-batch step
    names = [v.path for v in inner.trainable_variables]
    assert_weights_close(
        values(inner.trainable_variables), want_weights, rtol=1e-5, atol=1e-6, names=names
    )
    # BatchNorm statistics and seed states move once, from the clean pass.
    assert_weights_close(
        values(inner.non_trainable_variables),
        want_state,
        rtol=1e-5,
        atol=1e-6,
        names=[v.path for v in inner.non_trainable_variables],
    )


# ------------------- 2b. steps chosen on the host: sam_every, late phase
def _assign(model, weights, state):
    for v, w in zip(model.trainable_variables, weights):
        v.assign(np.asarray(w, np.float32))
    for v, w in zip(model.non_trainable_variables, state):
        v.assign(w)


def _hand_plain_step(model, family, x, y, lr=LR):
    tv = values(model.trainable_variables)
    _, g, new_state = loss_and_grad(model, family, tv, values(model.non_trainable_variables), x, y)
    return [w.astype(np.float64) - lr * gi for w, gi in zip(tv, g)], new_state


@pytest.mark.parametrize("schedule", ["sam_every2", "sam_start_epoch1"])
@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "mobilenet"])
def test_steps_chosen_on_the_host_equal_hand_written_steps(name, schedule):
    """Two full-batch steps, one per epoch: `sam_every=2` takes SAM's step
    then a plain one; `sam_start_epoch=1` a plain step (Keras' own) then
    SAM's. Each kind of step is its own compiled function."""
    family = FAMILIES[name]
    reference, inner = twins(family)
    x, y = family.data()
    kinds = ["sam", "plain"] if schedule == "sam_every2" else ["plain", "sam"]
    for kind in kinds:
        if kind == "sam":
            weights, state = hand_step(reference, family, "sam", x, y)
        else:
            weights, state = _hand_plain_step(reference, family, x, y)
        _assign(reference, weights, state)
    keywords = {"sam_every": 2} if schedule == "sam_every2" else {"sam_start_epoch": 1}
    model = keras_sam.SAMModel(inner, rho=SAM_RHO, **keywords)
    model.compile(**family.compile_kwargs())
    history = fit(model, family, x, y, epochs=2, batch_size=N)
    assert history.history["sam_fraction"] == [float(k == "sam") for k in kinds]
    assert_weights_close(
        values(inner.variables),
        values(reference.variables),
        rtol=1e-5,
        atol=1e-6,
        names=[v.path for v in inner.variables],
    )


# --------------------------------------------------- 3. habits around fit
class RecordLearningRate(keras.callbacks.Callback):
    """The learning rate each training step actually ran with."""

    def __init__(self):
        super().__init__()
        self.rates = []

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(to_numpy(self.model.optimizer.learning_rate)))


def _gsam_rho_rule(lr, rho, rho_min, lr_max):
    return rho_min + (rho - rho_min) * lr / lr_max  # lr_min = 0


@pytest.mark.parametrize(
    "name, callback",
    [
        ("cnn_bn_dropout", "LearningRateScheduler"),
        ("text_lstm", "ReduceLROnPlateau"),
    ],
)
def test_gsam_rho_follows_learning_rate_callbacks(name, callback):
    family = FAMILIES[name]
    rho, rho_min, lr0, epochs = 0.1, 0.02, 0.1, 4
    model = keras_sam.GSAMModel(family.build(0), rho=rho, alpha=0.2, rho_min=rho_min)
    model.compile(**family.compile_kwargs(keras.optimizers.SGD(lr0)))
    if callback == "LearningRateScheduler":
        changer = keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr0 * 0.5**epoch)
    else:  # every epoch after the first counts as a plateau
        changer = keras.callbacks.ReduceLROnPlateau(
            monitor="loss", factor=0.5, patience=0, min_delta=1e9, cooldown=0
        )
    record = RecordLearningRate()
    x, y = family.data()
    history = fit(model, family, x, y, epochs=epochs, batch_size=N, callbacks=[changer, record])
    assert len(record.rates) == epochs
    assert record.rates[-1] < lr0 / 3, record.rates  # the callback did change the rate
    expected = [_gsam_rho_rule(lr, rho, rho_min, lr0) for lr in record.rates]
    np.testing.assert_allclose(history.history["rho"], expected, rtol=1e-6)


HABIT_CASES = [("multi_io", "gsam"), ("transformer", "asam"), ("text_lstm", "sam")]


def _config(model, drop_name=False):
    """get_config() as it reads after a JSON round trip (tuples -> lists)."""
    config = json.loads(json.dumps(model.get_config()))
    if drop_name:
        config.pop("name", None)
    return config


@pytest.mark.parametrize("name, variant", HABIT_CASES)
def test_model_checkpoint_reloads_same_predictions_and_config(tmp_path, name, variant):
    family = FAMILIES[name]
    model = VARIANTS[variant](family.build(0))
    model.compile(**family.compile_kwargs())
    path = str(tmp_path / "checkpoint.keras")
    x, y = family.data()
    fit(model, family, x, y, epochs=2, callbacks=[keras.callbacks.ModelCheckpoint(path)])
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(model)
    assert _config(loaded) == _config(model)
    for a, b in zip(
        tree.flatten(loaded.predict(x, verbose=0)), tree.flatten(model.predict(x, verbose=0))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


class Interrupt(keras.callbacks.Callback):
    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise RuntimeError("simulated preemption")


@pytest.mark.parametrize("name, variant", [("text_lstm", "gsam"), ("multi_io", "sam")])
def test_backup_and_restore_resumes_like_an_uninterrupted_run(tmp_path, name, variant):
    family = FAMILIES[name]
    x, y = family.data()
    epochs = 3

    def wrapper(inner):
        model = VARIANTS[variant](inner)
        model.compile(**family.compile_kwargs(keras.optimizers.SGD(0.05, momentum=0.9)))
        return model

    first, straight = twins(family)
    uninterrupted = wrapper(straight)
    fit(uninterrupted, family, x, y, epochs=epochs)

    backup_dir = str(tmp_path / "backup")
    interrupted = wrapper(first)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        fit(
            interrupted,
            family,
            x,
            y,
            epochs=epochs,
            callbacks=[keras.callbacks.BackupAndRestore(backup_dir), Interrupt(1)],
        )
    # A new process: a fresh model with other initial weights, restored from the backup.
    resumed = wrapper(family.build(seed=7))
    history = fit(
        resumed,
        family,
        x,
        y,
        epochs=epochs,
        callbacks=[keras.callbacks.BackupAndRestore(backup_dir)],
    )
    assert len(history.epoch) == epochs - 2, history.epoch  # only the last epoch ran
    assert_weights_close(
        values(resumed.inner.weights),
        values(straight.weights),
        rtol=1e-5,
        atol=1e-6,
        names=[v.path for v in straight.weights],
    )


@pytest.mark.parametrize("name, variant", [("multi_io", "gsam"), ("cnn_bn_dropout", "sam")])
def test_evaluate_and_validation_logs_are_plain_keras(name, variant):
    family = FAMILIES[name]
    x, y = family.data()
    x_val, y_val = family.data(seed=2)
    model = VARIANTS[variant](family.build(0))
    # The noise scale estimate is a training statistic too.
    model = type(model).from_config({**model.get_config(), "noise_scale": True})
    model.compile(**family.compile_kwargs())
    history = fit(model, family, x, y, batch_size=N, validation_data=(x_val, y_val))

    plain = family.build(0)
    plain.compile(**family.compile_kwargs())
    copy_state(model.inner, plain)
    want = plain.evaluate(x, y, batch_size=N, verbose=0, return_dict=True)
    got = model.evaluate(x, y, batch_size=N, verbose=0, return_dict=True)
    leaked = [k for k in got if k in SAM_KEYS + ("noise_scale",)]
    assert not leaked, f"evaluate() reports SAM training statistics {leaked}: {got}"
    assert sorted(got) == sorted(want)
    assert_logs_equal(got, want, rtol=1e-5, atol=1e-6)

    logs = history.history
    leaked = [k for k in logs if k in {"val_" + s for s in SAM_KEYS + ("noise_scale",)}]
    assert not leaked, f"validation logs carry SAM training statistics {leaked}"
    for key in SAM_KEYS + ("noise_scale",):  # the training statistics are still there
        assert key in logs, sorted(logs)
    want_val = plain.evaluate(x_val, y_val, batch_size=N, verbose=0, return_dict=True)
    assert_logs_equal(
        {k[4:]: v[-1] for k, v in logs.items() if k.startswith("val_")},
        want_val,
        rtol=1e-5,
        atol=1e-6,
    )


def test_export_serves_like_predict(tmp_path):
    family = FAMILIES["cnn_bn_dropout"]
    probe = family.build(0)
    try:  # does Keras export this model (unwrapped) on this backend at all?
        probe.export(str(tmp_path / "probe"), verbose=False)
    except Exception as exc:  # e.g. torch.export's dynamic-shape error (Keras 3.15)
        pytest.skip(
            f"Keras cannot export the plain model on {BACKEND}: "
            f"{type(exc).__name__}: {str(exc)[:200]}"
        )
    import tensorflow as tf

    model = VARIANTS["sam"](family.build(0))
    model.compile(**family.compile_kwargs())
    x, y = family.data()
    fit(model, family, x, y)
    path = str(tmp_path / "exported")
    model.export(path, verbose=False)
    reloaded = tf.saved_model.load(path)  # keep a reference while serving
    served = reloaded.serve(tf.constant(x))
    np.testing.assert_allclose(
        np.asarray(served), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name, variant", [("transformer", "asam"), ("multi_io", "gsam")])
def test_clone_model_compiles_and_trains_like_the_original(name, variant):
    family = FAMILIES[name]
    if variant == "gsam":  # rho following a float rate: read when fit starts
        model = keras_sam.GSAMModel(family.build(0), rho=SAM_RHO, alpha=GSAM_ALPHA, rho_min=0.01)
    else:
        model = VARIANTS[variant](family.build(0))
    clone = keras.models.clone_model(model)
    assert type(clone) is type(model)
    assert _config(clone, drop_name=True) == _config(model, drop_name=True)
    clone.set_weights(model.get_weights())
    start = values(model.inner.trainable_variables)
    x, y = family.data()
    for m in (model, clone):
        m.compile(**family.compile_kwargs())
        fit(m, family, x, y)
    trained = values(clone.inner.trainable_variables)
    assert any(np.abs(a - b).max() > 1e-6 for a, b in zip(trained, start)), "did not train"
    assert_weights_close(
        values(clone.inner.weights), values(model.inner.weights), rtol=1e-6, atol=1e-7
    )


# ------------------------------------------- 4. mixed precision, generators
def _embedding_classifier(seed):
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((SEQ,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, 8)(tokens)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = keras.layers.Dense(CLASSES)(h)
    # As the mixed-precision guide says: the last activation in float32.
    return keras.Model(tokens, keras.layers.Activation("softmax", dtype="float32")(h))


@pytest.fixture
def mixed_float16():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_mixed_float16_embedding_sam_step_matches_float32_reference(request):
    if BACKEND != "tensorflow":
        pytest.skip("the mixed_float16 Embedding check is for the TensorFlow backend")
    family = Family(_embedding_classifier, _token_data, "sparse_categorical_crossentropy")
    reference = family.build(0)  # float32
    x, y = family.data()
    want, _ = hand_step(reference, family, "sam", x, y)
    request.getfixturevalue("mixed_float16")
    inner = family.build(0)
    assert inner.layers[1].compute_dtype == "float16"
    copy_state(reference, inner)
    start = values(inner.trainable_variables)
    model = keras_sam.SAMModel(inner, rho=SAM_RHO)
    model.compile(**family.compile_kwargs())
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = fit(model, family, x, y, batch_size=N)
    got = values(inner.trainable_variables)
    assert all(np.isfinite(w).all() for w in got)
    assert np.isfinite(history.history["loss"]).all()
    for g, w, s, v in zip(got, want, start, inner.trainable_variables):
        step_want = w - s
        assert np.abs(g - s).max() > 0.1 * np.abs(step_want).max(), f"{v.path}: step skipped"
        np.testing.assert_allclose(
            g - s, step_want, rtol=0.05, atol=0.02 * np.abs(step_want).max(), err_msg=v.path
        )


@pytest.mark.parametrize("variant", ["sam", "gsam"])
def test_generator_input_trains_the_multi_output_model_like_arrays(variant):
    family = FAMILIES["multi_io"]
    x, y = family.data()

    def batches():
        while True:
            for start in range(0, N, BATCH):
                sl = slice(start, start + BATCH)
                yield ({k: v[sl] for k, v in x.items()}, {k: v[sl] for k, v in y.items()})

    a, b = twins(family)
    from_generator, from_arrays = VARIANTS[variant](a), VARIANTS[variant](b)
    for m in (from_generator, from_arrays):
        m.compile(**family.compile_kwargs())
    logs = from_generator.fit(batches(), steps_per_epoch=N // BATCH, epochs=2, verbose=0).history
    want = fit(from_arrays, family, x, y, epochs=2).history
    assert np.isfinite(logs["loss"]).all()
    assert_weights_close(values(a.variables), values(b.variables), rtol=1e-6, atol=1e-7)
    assert_logs_equal(logs, want)


def test_both_passes_see_the_same_dropout_mask_without_a_seed():
    """An unseeded Dropout (torch draws it from its global generator): with a
    tiny rho the perturbed loss differs from the clean one by about
    rho * ||g||, which a second, different mask would swamp."""
    keras.utils.set_random_seed(0)
    inner = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(CLASSES),
        ]
    )
    model = keras_sam.SAMModel(inner, rho=1e-6)
    model.compile(
        optimizer=keras.optimizers.SGD(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, 16)).astype("float32"), _labels(rng, N)
    history = model.fit(x, y, batch_size=N, epochs=3, verbose=0)
    grad_norm = max(history.history["grad_norm"])
    assert max(abs(s) for s in history.history["sharpness"]) <= 2e-6 * grad_norm + 1e-6


# ------------------- 5. one-gradient methods: Momentum-SAM, RWP and MESA
MSAM_RHO, MOMENTUM, MESA_WEIGHT, MESA_TAU = 0.3, 0.9, 0.8, 2.0


def _kl_output(name):
    return "out_b" if name == "multi_io" else None


ONE_GRADIENT = {
    "msam": lambda inner, name, zero=False: keras_sam.MSAMModel(
        inner, rho=0.0 if zero else MSAM_RHO
    ),
    "rwp": lambda inner, name, zero=False: keras_sam.RWPModel(
        inner, rho=0.0 if zero else 0.01, seed=0
    ),
    "mesa": lambda inner, name, zero=False: keras_sam.MESAModel(
        inner,
        kl_weight=0.0 if zero else MESA_WEIGHT,
        temperature=MESA_TAU,
        ema_decay=0.5,
        kl_start_epoch=-1,
        kl_output=_kl_output(name),
    ),
}


def _momentum():
    return keras.optimizers.SGD(LR, momentum=MOMENTUM)


@pytest.mark.parametrize("variant", list(ONE_GRADIENT))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_one_gradient_methods_at_zero_equal_plain_keras(name, variant):
    """rho=0 (MSAM) and kl_weight=0 (MESA): plain Keras with the same
    optimizer, every variable and every History key."""
    family = FAMILIES[name]
    start, plain = twins(family)
    plain.compile(**family.compile_kwargs(_momentum()))
    x, y = family.data()
    want = fit(plain, family, x, y).history
    inner = family.build(0)
    copy_state(start, inner)
    model = ONE_GRADIENT[variant](inner, name, zero=True)
    model.compile(**family.compile_kwargs(_momentum()))
    got = fit(model, family, x, y).history
    assert_weights_close(
        values(inner.variables),
        values(plain.variables),
        rtol=1e-6,
        atol=1e-6,
        names=[v.path for v in inner.variables],
    )
    assert_logs_equal(got, want)


def _hand_kl(family, name, teacher_pred):
    """The MESA term written out with keras.ops: the families output
    probabilities, whose logarithms are the logits."""

    def pick(pred):
        return pred[1] if name == "multi_io" else pred

    q = ops.softmax(ops.log(pick(teacher_pred)) / MESA_TAU)

    def kl(y_pred):
        log_p = ops.log_softmax(ops.log(pick(y_pred)) / MESA_TAU)
        return MESA_WEIGHT * MESA_TAU**2 * ops.mean(ops.sum(q * (ops.log(q) - log_p), axis=-1))

    return kl


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "mobilenet"])
def test_msam_second_step_equals_hand_written_step(name):
    """Step 1 at w0 (no momentum yet); step 2 takes its gradient at
    w1 - rho v/||v|| with v = g0, then v = mu v + g1, w2 = w1 - lr v."""
    family = FAMILIES[name]
    inner = family.build(0)
    x, y = family.data()
    tv, ntv = values(inner.trainable_variables), values(inner.non_trainable_variables)
    _, g0, s1 = loss_and_grad(inner, family, tv, ntv, x, y)
    w1 = [w.astype(np.float64) - LR * g for w, g in zip(tv, g0)]
    adv = [(w - MSAM_RHO * g / _norm(g0)).astype(np.float32) for w, g in zip(w1, g0)]
    _, g1, s2 = loss_and_grad(inner, family, adv, s1, x, y)
    want = [w - LR * (MOMENTUM * a + b) for w, a, b in zip(w1, g0, g1)]
    model = ONE_GRADIENT["msam"](inner, name)
    model.compile(**family.compile_kwargs(_momentum()))
    fit(model, family, x, y, epochs=2, batch_size=N)
    assert_weights_close(
        values(inner.trainable_variables),
        want,
        rtol=1e-4,
        atol=1e-5,
        names=[v.path for v in inner.trainable_variables],
    )
    assert_weights_close(values(inner.non_trainable_variables), s2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "mobilenet"])
def test_mesa_step_equals_hand_written_step(name):
    """One step of the loss plus the KL to the teacher, the starting model
    in inference mode; the average then moves halfway to the new weights."""
    family = FAMILIES[name]
    inner = family.build(0)
    x, y = family.data()
    tv, ntv = values(inner.trainable_variables), values(inner.non_trainable_variables)
    teacher_pred, _ = inner.stateless_call(
        [ops.convert_to_tensor(w) for w in tv],
        [ops.convert_to_tensor(s) for s in ntv],
        _tensors(x),
        training=False,
    )
    extra = _hand_kl(family, name, teacher_pred)
    plain_loss = family.hand_loss
    family.hand_loss = lambda y_, p: plain_loss(y_, p) + extra(p)
    try:
        _, g, state = loss_and_grad(inner, family, tv, ntv, x, y)
    finally:
        family.hand_loss = plain_loss
    want = [w.astype(np.float64) - LR * gi for w, gi in zip(tv, g)]
    model = ONE_GRADIENT["mesa"](inner, name)
    model.compile(**family.compile_kwargs())
    fit(model, family, x, y, batch_size=N)
    names = [v.path for v in inner.trainable_variables]
    assert_weights_close(values(inner.trainable_variables), want, rtol=1e-5, atol=1e-6, names=names)
    ema = dict(zip([v.path for v in inner.weights], model.ema_weights()))
    start = dict(zip([v.path for v in inner.trainable_variables], tv))
    assert_weights_close(
        [ema[p] for p in names],
        [0.5 * start[p] + 0.5 * w for p, w in zip(names, want)],
        rtol=1e-5,
        atol=1e-6,
        names=names,
    )


# ------------------------------------- the noise scale leaves training as is
@pytest.mark.parametrize("name", ["text_lstm", "transformer", "multi_io", "cnn_bn_dropout"])
def test_noise_scale_estimate_keeps_the_training(name):
    """Without BatchNorm or Dropout the halves' mean gradient is the batch's:
    the same weights and logs as without the estimate (float32 rounding),
    plus `noise_scale` (inf where the averaged |G|^2 estimate is not positive,
    as on these few random examples). With them each half normalizes and
    draws its masks on its own, and only the logs' keys are checked."""
    family = FAMILIES[name]
    x, y = family.data()
    runs = {}
    for on in (False, True):
        inner = family.build(0)
        model = keras_sam.SAMModel(inner, rho=SAM_RHO, noise_scale=on)
        model.compile(**family.compile_kwargs())
        runs[on] = (values(inner.trainable_variables), fit(model, family, x, y, epochs=2).history)
    (w_off, logs_off), (w_on, logs_on) = runs[False], runs[True]
    noise = np.asarray(logs_on.pop("noise_scale"))
    assert noise.shape == (2,) and not np.any(np.isnan(noise)), noise
    assert sorted(logs_on) == sorted(logs_off)
    if name != "cnn_bn_dropout":
        assert_weights_close(w_on, w_off, rtol=1e-5, atol=1e-6)
        assert_logs_equal(logs_on, logs_off, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["text_lstm", "transformer", "multi_io"])
def test_noise_scale_equals_the_estimate_from_hand_gradients(name):
    """At fixed weights (lr 0), two steps of 4 examples: the logged noise
    scale is the moving average of the two-size estimates from the halves'
    and the batch's gradients, taken here with the backend's own autodiff."""
    family = FAMILIES[name]
    x, y = family.data()
    inner = family.build(0)
    tv, ntv = values(inner.trainable_variables), values(inner.non_trainable_variables)
    decay, half = 0.5, BATCH // 2
    average = np.zeros(2)
    for step in range(N // BATCH):

        def rows(start, stop, step=step):
            return tree.map_structure(
                lambda t: t[step * BATCH + start : step * BATCH + stop], (x, y)
            )

        halves = [loss_and_grad(inner, family, tv, ntv, *rows(a, a + half))[1] for a in (0, half)]
        whole = loss_and_grad(inner, family, tv, ntv, *rows(0, BATCH))[1]
        small = np.mean([_norm(g) ** 2 for g in halves])
        large = _norm(whole) ** 2
        b, big = half, BATCH
        terms = [(big * large - b * small) / (big - b), (small - large) / (1 / b - 1 / big)]
        average = decay * average + (1 - decay) * np.array(terms)

    model = keras_sam.SAMModel(inner, rho=SAM_RHO, noise_scale=True, noise_scale_decay=decay)
    model.compile(**family.compile_kwargs(keras.optimizers.SGD(0.0)))
    logged = fit(model, family, x, y).history["noise_scale"][-1]
    got = to_numpy(model._noise.average)
    np.testing.assert_allclose(got[:2], average, rtol=1e-4, atol=1e-9)
    assert got[2] == N // BATCH  # every step measured
    if average[0] > 0:
        assert logged == pytest.approx(average[1] / average[0], rel=1e-4)
    else:  # the averaged |G|^2 estimate is not positive: all noise
        assert np.isinf(logged)
