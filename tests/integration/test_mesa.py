"""MESA (`MESAModel`) against a float64 NumPy replay of its step.

A linear softmax classifier has a closed-form gradient of cross-entropy plus
`lambda tau^2 KL(softmax(z_ema/tau) || softmax(z/tau))`:
`dz = (p - onehot) / n + lambda tau (p_tau - q_tau) / n`, so the whole
trajectory, the EMA teacher and the epoch at which the term switches on can
be replayed exactly. The EMA must survive save / load and `BackupAndRestore`.
(Other backends: tests/backends/test_backends.py; model families:
tests/integration/test_model_families.py.)
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from strategies import mirrored

import keras_sam

N, D, C, BATCH, LR = 24, 4, 3, 8, 0.5


def data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N, D)).astype("float32"), rng.integers(0, C, size=(N,))


def linear(seed=0):
    inner = keras.Sequential([keras.Input((D,)), keras.layers.Dense(C)])
    rng = np.random.default_rng(seed)
    for v in inner.trainable_variables:
        v.assign(rng.normal(scale=0.5, size=v.shape).astype("float32"))
    return inner


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def replay(w, b, x, y, epochs, kl_weight, tau, decay, start):
    """SGD on CE + lambda tau^2 KL(teacher || model), EMA after each step."""
    w, b = w.astype(np.float64), b.astype(np.float64)
    ew, eb = w.copy(), b.copy()
    kls = []
    for epoch in range(epochs):
        epoch_kl = []
        for s in range(0, N, BATCH):
            xb, yb = x[s : s + BATCH].astype(np.float64), y[s : s + BATCH]
            z, zt = xb @ w + b, xb @ ew + eb
            p, q = softmax(z / tau), softmax(zt / tau)
            epoch_kl.append(np.mean(np.sum(q * (np.log(q) - np.log(p)), -1)) * tau**2)
            dz = (softmax(z) - np.eye(C)[yb]) / len(xb)
            if epoch > start:
                dz = dz + kl_weight * tau * (p - q) / len(xb)
            w, b = w - LR * xb.T @ dz, b - LR * dz.sum(axis=0)
            ew, eb = decay * ew + (1 - decay) * w, decay * eb + (1 - decay) * b
        kls.append(np.mean(epoch_kl))
    return (w, b), (ew, eb), kls


def compiled(model, optimizer=None, **kwargs):
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **kwargs,
    )
    return model


def flat(ts):
    return np.concatenate([np.asarray(t).ravel() for t in ts])


@pytest.mark.parametrize("start", [-1, 1])
def test_matches_the_replay_with_its_teacher_and_start_epoch(start):
    x, y = data()
    inner = linear()
    w0, b0 = (v.numpy() for v in inner.trainable_variables)
    model = compiled(
        keras_sam.MESAModel(
            inner, kl_weight=0.8, temperature=2.0, ema_decay=0.7, kl_start_epoch=start
        )
    )
    history = model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    weights, ema, kls = replay(w0, b0, x, y, 3, 0.8, 2.0, 0.7, start)
    np.testing.assert_allclose(
        flat(v.numpy() for v in inner.trainable_variables), flat(weights), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(flat(model.ema_weights()), flat(ema), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(history.history["kl"], kls, rtol=1e-4, atol=1e-7)
    assert set(history.history) == {"loss", "kl", "grad_norm"}


def test_probability_outputs_give_the_same_steps_as_logits():
    """With a softmax output and a string loss, log p serves as the logits."""
    x, y = data()
    a = linear()
    b = keras.Sequential([keras.Input((D,)), keras.layers.Dense(C, activation="softmax")])
    b.set_weights(a.get_weights())
    ma = compiled(keras_sam.MESAModel(a, ema_decay=0.5, kl_start_epoch=-1))
    mb = keras_sam.MESAModel(b, ema_decay=0.5, kl_start_epoch=-1)
    mb.compile(optimizer=keras.optimizers.SGD(LR), loss="sparse_categorical_crossentropy")
    ha = ma.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    hb = mb.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    np.testing.assert_allclose(flat(b.get_weights()), flat(a.get_weights()), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(hb.history["kl"], ha.history["kl"], rtol=1e-3, atol=1e-6)


def cnn(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3, seed=1),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )


def test_kl_weight_zero_is_plain_keras_exactly():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(24, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, size=(24,))

    def run(wrap):
        inner = cnn()
        model = keras_sam.MESAModel(inner, kl_weight=0.0) if wrap else inner
        compiled(model, keras.optimizers.SGD(0.1, momentum=0.9), metrics=["accuracy"])
        h = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        return inner, h.history

    plain, hp = run(False)
    mesa, hm = run(True)
    for a, b in zip(plain.variables, mesa.variables):  # BatchNorm statistics too
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert hp["loss"] == hm["loss"] and hp["accuracy"] == hm["accuracy"]


def bn_net(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.BatchNormalization(momentum=0.5),
            keras.layers.Dense(C),
        ]
    )


def test_the_teacher_averages_batchnorm_statistics_and_runs_in_inference_mode():
    """Every variable, BatchNorm statistics included, is averaged after each
    step; the first step's teacher is the starting model in inference mode
    (BatchNorm with its moving statistics), the student in training mode."""
    x, y = data()
    inner = bn_net()
    start = [v.numpy().copy() for v in inner.weights]
    teacher = keras.ops.convert_to_numpy(inner(x[:BATCH], training=False))
    student = keras.ops.convert_to_numpy(inner(x[:BATCH], training=True))
    inner.set_weights(start)  # the training-mode call moved the statistics
    model = compiled(keras_sam.MESAModel(inner, ema_decay=0.5, kl_start_epoch=-1, temperature=2.0))
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append([v.numpy().copy() for v in inner.weights])

    history = model.fit(
        x[:BATCH],
        y[:BATCH],
        batch_size=BATCH,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[Record()],
    )
    ema = start
    for values in seen:
        ema = [0.5 * a + 0.5 * b for a, b in zip(ema, values)]
    np.testing.assert_allclose(flat(model.ema_weights()), flat(ema), rtol=1e-5, atol=1e-6)
    q, p = softmax(teacher / 2.0), softmax(student / 2.0)
    kl = np.mean(np.sum(q * (np.log(q) - np.log(p)), -1)) * 4.0
    np.testing.assert_allclose(history.history["kl"][0], kl, rtol=1e-4)
    assert kl > 1e-4  # inference and training mode differ here


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kl_weight=-1.0), "kl_weight"),
        (dict(temperature=0.0), "temperature"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(kl_start_epoch=1.5), "kl_start_epoch"),
        (dict(from_logits="yes"), "from_logits"),
        (dict(sam_every=2), "sam_every"),
        (dict(num_batch_splits=2), "num_batch_splits"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_sam.MESAModel(linear(), **kwargs)


def test_a_loss_that_does_not_say_logits_or_probabilities_fails_before_training():
    x, y = data()
    inner = linear()
    before = flat(inner.get_weights())
    model = keras_sam.MESAModel(inner)
    model.compile(optimizer="sgd", loss=lambda t, p: keras.ops.mean(p))
    with pytest.raises(ValueError, match="from_logits"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    np.testing.assert_array_equal(flat(inner.get_weights()), before)


def test_save_load_keeps_the_average_and_continues_like_an_uninterrupted_run(tmp_path):
    x, y = data()

    def fresh():
        return compiled(keras_sam.MESAModel(linear(), ema_decay=0.6, kl_start_epoch=0))

    whole = fresh()
    whole.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    part = fresh()
    part.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    part.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded) is keras_sam.MESAModel
    assert loaded.get_config()["ema_decay"] == 0.6
    np.testing.assert_array_equal(flat(loaded.ema_weights()), flat(part.ema_weights()))
    loaded.fit(x, y, batch_size=BATCH, epochs=3, initial_epoch=2, shuffle=False, verbose=0)
    np.testing.assert_allclose(
        flat(loaded.get_weights()), flat(whole.get_weights()), rtol=1e-6, atol=1e-7
    )


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_like_an_uninterrupted_run(tmp_path):
    """The average and the epoch counter come back: the term switches on at
    the same epoch as in the uninterrupted run."""
    x, y = data()

    def fresh(seed=0):
        return compiled(keras_sam.MESAModel(linear(seed), ema_decay=0.6, kl_start_epoch=2))

    whole = fresh()
    whole.fit(x, y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    run = fresh()
    with pytest.raises(RuntimeError, match="interrupted"):
        run.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=4,
            shuffle=False,
            verbose=0,
            callbacks=[backup, _Interrupt()],
        )
    resumed = fresh(seed=5)  # other weights: everything is restored
    resumed.fit(x, y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0, callbacks=[backup])
    np.testing.assert_allclose(
        flat(resumed.get_weights()), flat(whole.get_weights()), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(
        flat(resumed.ema_weights()), flat(whole.ema_weights()), rtol=1e-6, atol=1e-7
    )


def test_two_replicas_equal_one_device():
    x, y = data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)

    def run(strategy):
        with strategy.scope():
            model = compiled(keras_sam.MESAModel(linear(), ema_decay=0.6, kl_start_epoch=0))
        history = model.fit(ds, epochs=2, verbose=0)
        return model, history.history

    one, h1 = run(tf.distribute.get_strategy())
    two, h2 = run(mirrored(2))
    np.testing.assert_allclose(
        flat(two.get_weights()), flat(one.get_weights()), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        flat(two.ema_weights()), flat(one.ema_weights()), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(h2["loss"], h1["loss"], rtol=1e-5)
    np.testing.assert_allclose(h2["kl"], h1["kl"], rtol=1e-4, atol=1e-7)
