"""BatchSizeOnPlateau: the batch grows where Keras' ReduceLROnPlateau would
cut the rate, through BatchSizeScheduler.

The decisions against Keras' own ReduceLROnPlateau driven by the same
monitored values (an independent reference for the waiting and cooldown
rules) and against a hand-written table; the cap, the noise-scale guard and
the errors; a fit whose batch sizes follow the rule replayed on its own
History (this process; JAX and PyTorch: tests/support/backend_check.py);
BackupAndRestore mid-run against the uninterrupted run.
"""

import os

import keras
import numpy as np
import pytest
from growing_batch_data import N
from growing_batch_data import data
from growing_batch_data import dataset_fn
from growing_batch_data import mlp
from interrupts import Interrupt
from interrupts import InterruptAt

import keras_sam
from keras_sam.callbacks import BatchSizeOnPlateau
from keras_sam.callbacks import BatchSizeScheduler

tf = pytest.importorskip("tensorflow")  # the pipelines are tf.data


def decisions(policy, values, key="loss"):
    """The epochs after which the batch grew, feeding `values` one per epoch."""
    grew = []
    for epoch, value in enumerate(values):
        before = policy(epoch)
        if policy.decide_from_logs(epoch, {key: value}) != before:
            grew.append(epoch)
    return grew


def keras_reductions(values, patience, min_delta, cooldown):
    """The epochs at whose end Keras' ReduceLROnPlateau cuts the rate."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    callback = keras.callbacks.ReduceLROnPlateau(
        monitor="loss", factor=0.5, patience=patience, min_delta=min_delta, cooldown=cooldown,
        min_lr=0.0,
    )  # fmt: skip
    callback.set_model(model)
    callback.on_train_begin()
    cut, rate = [], 1.0
    for epoch, value in enumerate(values):
        callback.on_epoch_end(epoch, {"loss": value})
        now = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
        if now != rate:
            cut.append(epoch)
            rate = now
    return cut


SEQUENCES = {
    "steady": [1.0 - 0.01 * i for i in range(30)],
    "flat": [1.0] * 30,
    "noisy": list(1.0 + 0.05 * np.sin(np.arange(40) * 1.7) - 0.003 * np.arange(40)),
    "stairs": [1.0] * 6 + [0.8] * 6 + [0.79995] * 6 + [0.5] * 12,
    "with_nan": [1.0, 0.9, float("nan"), 0.9, 0.9, 0.95, 0.85, 0.85, 0.85, 0.85],
}


@pytest.mark.parametrize("name", list(SEQUENCES))
@pytest.mark.parametrize(
    "patience, min_delta, cooldown", [(0, 0.0, 0), (2, 1e-4, 0), (3, 0.01, 2), (1, 0.0, 3)]
)
def test_grows_where_keras_reduce_lr_on_plateau_cuts_the_rate(name, patience, min_delta, cooldown):
    values = SEQUENCES[name]
    policy = BatchSizeOnPlateau(
        4, patience=patience, min_delta=min_delta, cooldown=cooldown, max_batch_size=2**40
    )
    assert decisions(policy, values) == keras_reductions(values, patience, min_delta, cooldown)


def test_a_hand_written_table():
    """patience 2, cooldown 1, factor 2, max 32: the counters by hand."""
    values = [5, 4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3]
    policy = BatchSizeOnPlateau(8, patience=2, min_delta=0, cooldown=1, max_batch_size=32)
    sizes = []
    for epoch, value in enumerate(values):
        policy.decide_from_logs(epoch, {"loss": value})
        sizes.append(policy(epoch + 1))
    # epochs 2, 3: wait 1, 2 -> grow after epoch 3; epoch 4 cooldown; 5
    # improves; 6, 7 wait -> grow after 7 (to the cap); 8 cooldown; then
    # the cap holds however long the loss stalls.
    assert sizes == [8, 8, 8, 16, 16, 16, 16, 32, 32, 32, 32, 32]
    assert policy.history == {0: 8, 4: 16, 8: 32}


def test_the_noise_scale_guard_waits_for_a_noise_scale_that_pays():
    policy = BatchSizeOnPlateau(
        8, patience=1, min_delta=0, max_batch_size=64, noise_scale_threshold=2.0
    )
    logs = [
        {"loss": 1.0, "noise_scale": 100.0},  # improves (from inf)
        {"loss": 1.0, "noise_scale": 15.0},  # stalls, 15 < 2 * 8: keeps 8
        {"loss": 1.0, "noise_scale": float("nan")},  # not measured: keeps 8
        {"loss": 1.0, "noise_scale": 16.0},  # 16 >= 2 * 8: grows
    ]
    sizes = []
    for epoch, entry in enumerate(logs):
        sizes.append(policy.decide_from_logs(epoch, entry))
    assert sizes == [8, 8, 8, 16]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(initial_batch_size=0, max_batch_size=8), "initial_batch_size"),
        (dict(initial_batch_size=8), "max_batch_size"),
        (dict(initial_batch_size=8, max_batch_size=4), "max_batch_size"),
        (dict(initial_batch_size=8, max_batch_size=16, factor=1), "factor"),
        (dict(initial_batch_size=8, max_batch_size=16, patience=-1), "patience"),
        (dict(initial_batch_size=8, max_batch_size=16, min_delta=-0.1), "min_delta"),
        (dict(initial_batch_size=8, max_batch_size=16, cooldown=1.5), "cooldown"),
        (dict(initial_batch_size=8, max_batch_size=16, monitor=""), "monitor"),
        (dict(initial_batch_size=8, max_batch_size=16, noise_scale_threshold=0), "noise_scale"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BatchSizeOnPlateau(**kwargs)


# ------------------------------------------------------------- through fit
EPOCHS = 10


def build(monitor="loss", **policy_kwargs):
    """SAM on a small MLP with a cosine rate over the scheduler's steps; a
    large min_delta makes the loss stall within a few epochs."""
    kwargs = dict(patience=1, min_delta=0.02, max_batch_size=64, monitor=monitor)
    policy = BatchSizeOnPlateau(4, **dict(kwargs, **policy_kwargs))
    scheduler = BatchSizeScheduler(policy, dataset_fn)
    inner = mlp()
    lr = keras_sam.schedules.CosineAnnealing(0.05, 0.001, EPOCHS, scheduler.steps_per_epoch(EPOCHS))
    model = keras_sam.SAMModel(inner, rho=0.05)
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9), loss="mse")
    return model, scheduler, policy


def fit(model, scheduler, *callbacks, **kwargs):
    return model.fit(
        dataset_fn(4),
        epochs=EPOCHS,
        callbacks=[scheduler, *callbacks],
        shuffle=False,
        verbose=0,
        **kwargs,
    )


class StepCount(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.steps = []

    def on_epoch_begin(self, epoch, logs=None):
        self.steps.append(0)

    def on_train_batch_end(self, batch, logs=None):
        self.steps[-1] += 1


def test_a_fit_follows_the_rule_replayed_on_its_history():
    model, scheduler, _ = build()
    counter = StepCount()
    history = fit(model, scheduler, counter).history
    sizes = history["batch_size"]
    assert len(set(sizes)) >= 3, sizes  # it grew twice at least
    replay = BatchSizeOnPlateau(4, patience=1, min_delta=0.02, max_batch_size=64)
    expected = [4]
    for epoch, loss in enumerate(history["loss"][:-1]):
        expected.append(replay.decide_from_logs(epoch, {"loss": loss}))
    assert sizes == expected
    assert history["next_batch_size"][:-1] == sizes[1:]
    assert counter.steps == [N // b for b in sizes]  # each epoch drew its batch size
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == sum(counter.steps)


def test_val_loss_is_monitored_from_the_validation_data():
    model, scheduler, _ = build(monitor="val_loss")
    x, y = data()
    history = fit(model, scheduler, validation_data=(x[:64], y[:64])).history
    replay = BatchSizeOnPlateau(
        4, patience=1, min_delta=0.02, max_batch_size=64, monitor="val_loss"
    )
    expected = [4] + [
        replay.decide_from_logs(e, {"val_loss": v}) for e, v in enumerate(history["val_loss"][:-1])
    ]
    assert history["batch_size"] == expected


def test_a_missing_monitor_is_refused_before_training():
    model, scheduler, _ = build(monitor="val_loss")  # no validation data
    with pytest.raises(ValueError, match="'val_loss'.*validation_freq=1"):
        fit(model, scheduler)


def test_a_guard_without_the_noise_scale_is_refused_before_training():
    model, scheduler, _ = build(noise_scale_threshold=1.0)
    before = model.get_weights()
    with pytest.raises(ValueError, match="noise_scale=True"):
        fit(model, scheduler)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("at", [3, 6])
def test_backup_and_restore_resumes_like_the_uninterrupted_run(tmp_path, at):
    model, scheduler, _ = build()
    full = fit(model, scheduler).history

    backup = str(tmp_path / "backup")
    interrupted, scheduler, _ = build()
    with pytest.raises(Interrupt):
        fit(interrupted, scheduler, keras.callbacks.BackupAndRestore(backup), InterruptAt(at))
    assert os.path.exists(os.path.join(backup, BatchSizeOnPlateau.STATE_FILE))
    resumed, scheduler, _ = build()  # a new process would build everything anew
    rest = fit(resumed, scheduler, keras.callbacks.BackupAndRestore(backup)).history
    for key in ("batch_size", "next_batch_size", "loss"):
        np.testing.assert_allclose(rest[key], full[key][at:], rtol=1e-6, err_msg=key)
    for a, b in zip(resumed.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_decisions_of_another_policy_are_not_mixed_in(tmp_path):
    backup = str(tmp_path / "backup")
    model, scheduler, _ = build()
    with pytest.raises(Interrupt):
        fit(model, scheduler, keras.callbacks.BackupAndRestore(backup), InterruptAt(3))
    model, scheduler, _ = build(patience=2)
    with pytest.raises(ValueError, match="another BatchSizeOnPlateau"):
        fit(model, scheduler, keras.callbacks.BackupAndRestore(backup))


def test_steps_per_epoch_follows_the_decisions():
    model, scheduler, policy = build()
    history = fit(model, scheduler).history
    assert keras_sam.schedules.steps_per_epoch(N, policy, EPOCHS) == [
        N // b for b in history["batch_size"]
    ]


# ------------------------------------------- mode: "auto", "min" and "max"
def classification_dataset_fn(batch_size):
    x, y = data()
    return tf.data.Dataset.from_tensor_slices((x, (y > 0).astype("float32"))).batch(
        batch_size, drop_remainder=True
    )


def margin(y_true, y_pred):
    """A metric of our own: Keras cannot tell its direction."""
    return keras.ops.mean((2 * y_true - 1) * (y_pred - 0.5), axis=-1)


METRICS = lambda: [  # noqa: E731
    "accuracy",
    keras.metrics.AUC(name="auc"),
    keras.metrics.MeanMetricWrapper(margin, name="margin"),
]


def classifier(monitor, mode, seed=0):
    kwargs = dict(patience=1, min_delta=0.02, max_batch_size=64, monitor=monitor, mode=mode)
    policy = BatchSizeOnPlateau(4, **kwargs)
    scheduler = BatchSizeScheduler(policy, classification_dataset_fn)
    keras.utils.set_random_seed(seed)
    inner = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model = keras_sam.SAMModel(inner, rho=0.05)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss="binary_crossentropy",
        metrics=METRICS(),
    )
    return model, scheduler, policy


def keras_replay(history, monitor, mode):
    """The epochs at whose end Keras' ReduceLROnPlateau, with the same
    settings and a model compiled with the same metrics, cuts the rate."""
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(
        optimizer=keras.optimizers.SGD(1.0), loss="binary_crossentropy", metrics=METRICS()
    )
    x, y = data()
    model.fit(x[:8], (y[:8] > 0).astype("float32"), epochs=1, verbose=0)  # builds the metrics
    callback = keras.callbacks.ReduceLROnPlateau(
        monitor=monitor, factor=0.5, patience=1, min_delta=0.02, mode=mode, min_lr=0.0
    )
    callback.set_model(model)
    callback.on_train_begin()
    cut, rate = [], 1.0
    for epoch, value in enumerate(history[monitor]):
        callback.on_epoch_end(epoch, {monitor: value})
        now = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
        if now != rate:
            cut.append(epoch)
            rate = now
    return cut


def grown_after(history):
    """The epochs after which the batch grew (a cap reached stops growth: the
    replay then cuts on, so compare up to the cap)."""
    sizes = history["batch_size"] + [history["next_batch_size"][-1]]
    return [e for e in range(len(sizes) - 1) if sizes[e + 1] != sizes[e]]


def before_the_cap(cuts):
    """Keras' cuts, cut off where the batch reached its cap (64: four growths)."""
    return cuts[:4]


CASES = [
    ("val_accuracy", "auto", "max"),
    ("val_auc", "auto", "max"),
    ("loss", "auto", "min"),
    ("val_margin", "max", "max"),
]


@pytest.mark.parametrize("monitor, mode, direction", CASES)
def test_the_batch_grows_where_keras_cuts_the_rate_in_every_mode(monitor, mode, direction):
    model, scheduler, policy = classifier(monitor, mode)
    x, y = data()
    history = model.fit(
        classification_dataset_fn(4),
        validation_data=(x[:64], (y[:64] > 0).astype("float32")),
        epochs=EPOCHS,
        callbacks=[scheduler],
        verbose=0,
    ).history
    assert policy.direction == direction
    cuts = keras_replay(history, monitor, mode)
    assert grown_after(history) == before_the_cap(cuts)
    assert 0 < len(cuts) < EPOCHS  # the rule both waited and acted


@pytest.mark.parametrize("monitor, mode, direction", CASES[:1] + CASES[3:])
def test_an_interrupted_run_resumes_with_the_best_value_of_its_mode(
    tmp_path, monitor, mode, direction
):
    x, y = data()
    validation = (x[:64], (y[:64] > 0).astype("float32"))

    def run(*callbacks):
        model, scheduler, policy = classifier(monitor, mode)
        history = model.fit(
            classification_dataset_fn(4),
            validation_data=validation,
            epochs=EPOCHS,
            callbacks=[scheduler, *callbacks],
            verbose=0,
        ).history
        return model, history

    full_model, full = run()
    backup = str(tmp_path / "backup")
    with pytest.raises(Interrupt):
        run(keras.callbacks.BackupAndRestore(backup), InterruptAt(4))
    resumed, rest = run(keras.callbacks.BackupAndRestore(backup))
    assert rest["batch_size"] == full["batch_size"][4:]
    assert rest["next_batch_size"] == full["next_batch_size"][4:]
    assert grown_after(full) == before_the_cap(keras_replay(full, monitor, mode))
    for a, b in zip(resumed.get_weights(), full_model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_rising_accuracy_never_grows_the_batch_in_max_mode():
    kwargs = dict(monitor="val_accuracy", patience=0, max_batch_size=64)
    policy = BatchSizeOnPlateau(8, mode="max", **kwargs)
    assert decisions(policy, [0.5, 0.6, 0.7, 0.8, 0.9], key="val_accuracy") == []
    policy = BatchSizeOnPlateau(8, mode="min", **kwargs)
    assert decisions(policy, [0.5, 0.6, 0.7], key="val_accuracy") == [1, 2]


def test_a_metric_of_unknown_direction_is_refused_before_training():
    model, scheduler, _ = classifier("val_margin", "auto")
    x, y = data()
    before = model.get_weights()
    with pytest.raises(ValueError, match="mode='max'"):
        model.fit(
            classification_dataset_fn(4),
            validation_data=(x[:64], (y[:64] > 0).astype("float32")),
            epochs=2,
            callbacks=[scheduler],
            verbose=0,
        )
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_mode_is_saved_in_the_config_and_checked():
    policy = BatchSizeOnPlateau(8, monitor="val_auc", mode="max", max_batch_size=64)
    assert policy.get_config()["mode"] == "max"
    assert BatchSizeOnPlateau(**policy.get_config()).get_config() == policy.get_config()
    with pytest.raises(ValueError, match="`mode` must be one of"):
        BatchSizeOnPlateau(8, mode="maximum", max_batch_size=64)


# --------------------------------- a policy passed as a callback; val_* data
@pytest.mark.parametrize(
    "policy",
    [
        BatchSizeOnPlateau(4, max_batch_size=64),
        keras_sam.callbacks.AdaptiveBatchSize(4, max_batch_size=64),
    ],
    ids=["plateau", "adaptive"],
)
def test_a_policy_passed_as_a_callback_names_the_scheduler(policy):
    model, _, _ = build()
    before = model.get_weights()
    name = type(policy).__name__
    with pytest.raises(TypeError) as raised:
        model.fit(dataset_fn(4), epochs=1, callbacks=[policy], verbose=0)
    assert f"keras_sam.callbacks.BatchSizeScheduler({name}(...), dataset_fn)" in str(raised.value)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("wrapped", [True, False], ids=["SAMModel", "keras.Model"])
@pytest.mark.parametrize("validation", [None, "freq2"])
def test_val_monitor_without_validation_each_epoch_is_refused_before_training(wrapped, validation):
    policy = BatchSizeOnPlateau(4, monitor="val_loss", max_batch_size=64)
    scheduler = BatchSizeScheduler(policy, dataset_fn)
    model = mlp()
    if wrapped:
        model = keras_sam.SAMModel(model, rho=0.05)
    model.compile(optimizer="sgd", loss="mse")
    before = model.get_weights()
    kwargs = {}
    if validation == "freq2":
        x, y = data()
        kwargs = dict(validation_data=(x[:32], y[:32]), validation_freq=2)
    with pytest.raises(ValueError, match="'val_loss'.*validation_freq=1"):
        model.fit(dataset_fn(4), epochs=3, callbacks=[scheduler], verbose=0, **kwargs)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)
