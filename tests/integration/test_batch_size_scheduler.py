"""Tests for keras_sam.callbacks.BatchSizeScheduler (TensorFlow backend).

Every count is exact: the batches each epoch runs (seen by a callback), the
optimizer's iterations, the per-replica shape inside train_step, the number
of traces of train_step (a Python side effect runs only while tracing), the
steps the other callbacks and the progress bar are told, and the learning
rate of a step-based schedule at each epoch start.
"""

import csv
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from interrupts import Interrupt
from interrupts import InterruptAt
from strategies import mirrored

import keras_sam
from keras_sam import _keras_compat
from keras_sam._keras_compat import fit_loop
from keras_sam.callbacks.batch_size_scheduler import BatchSizeScheduler
from keras_sam.callbacks.batch_size_scheduler import doubling_schedule
from keras_sam.models import GSAMModel
from keras_sam.models import SAMModel

N = 64  # examples: 16 batches of 4, 8 of 8, 4 of 16
RAMP = {0: 4, 2: 8, 4: 16}
EPOCHS = 6
RAMP_SIZES = [4, 4, 8, 8, 16, 16]
RAMP_STEPS = [N // b for b in RAMP_SIZES]


def _data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5]], "float32") + 0.1).astype("float32")
    return x, y


X, Y = _data()
X_VAL, Y_VAL = _data(16, seed=1)


def dataset_fn(batch_size):
    return tf.data.Dataset.from_tensor_slices((X, Y)).batch(batch_size, drop_remainder=True)


def val_dataset():
    return tf.data.Dataset.from_tensor_slices((X_VAL, Y_VAL)).batch(8)


def _iterations(model):
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations.value))


class _Count:
    def __init__(self):
        self.n = 0


class CountingModel(keras.Model):
    """Dense(1); counts traces of train_step and logs the batch it got."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(1, kernel_initializer="ones")
        self.traces = _Count()

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        self.traces.n += 1  # Python: runs once per trace
        x, _, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        logs = dict(super().train_step(data))
        logs["replica_batch"] = tf.cast(tf.shape(x)[0], "float32")
        logs["weighted"] = tf.constant(float(sample_weight is not None))
        return logs


def _counting_model(jit_compile=False, steps_per_execution=1, lr=0.01):
    model = CountingModel()
    model.build((None, 3))
    model.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss="mse",
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    return model


class Recorder(keras.callbacks.Callback):
    """Records, per epoch, what the other callbacks see."""

    def __init__(self):
        super().__init__()
        self.batches = {}
        self.params_steps = {}
        self.progbar_targets = {}
        self.lr = {}
        self.replica_batch = {}
        self.iterations = {}
        self.batch_size = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.batches[epoch] = 0
        self.replica_batch[epoch] = set()
        self.params_steps[epoch] = self.params["steps"]
        self.lr[epoch] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_train_batch_end(self, batch, logs=None):
        self.batches[self.epoch] += 1
        if logs and "replica_batch" in logs:
            self.replica_batch[self.epoch].add(int(logs["replica_batch"]))

    def on_epoch_end(self, epoch, logs=None):
        self.iterations[epoch] = _iterations(self.model)
        self.batch_size[epoch] = logs.get("batch_size")

    def per_epoch(self, table):
        return [table[e] for e in sorted(table)]


class ProgbarProbe(keras.callbacks.Callback):
    """Placed after a ProgbarLogger: reads the target it just set up."""

    def __init__(self, progbar):
        super().__init__()
        self.progbar = progbar
        self.targets = []

    def on_epoch_begin(self, epoch, logs=None):
        bar = self.progbar.progbar
        self.targets.append((self.progbar.target, None if bar is None else bar.target))


class EpochLR(keras.optimizers.schedules.LearningRateSchedule):
    """lr = 0.05 / (epoch + 1), the epoch found from the known step list."""

    def __init__(self, steps_per_epoch):
        self.steps_per_epoch = list(steps_per_epoch)
        self.starts = np.cumsum([0] + self.steps_per_epoch[:-1]).astype("int64")

    def __call__(self, step):
        step = keras.ops.cast(step, "int64")
        starts = keras.ops.convert_to_tensor(self.starts[1:], "int64")
        epoch = keras.ops.sum(keras.ops.cast(step >= starts, "float32"))
        return 0.05 / (epoch + 1.0)

    def get_config(self):
        return {"steps_per_epoch": self.steps_per_epoch}


def _fit(model, schedule=RAMP, epochs=EPOCHS, extra=(), relax=None, **kwargs):
    scheduler = BatchSizeScheduler(schedule, dataset_fn, relax_batch_shape=relax)
    recorder = Recorder()
    history = model.fit(
        dataset_fn(scheduler.batch_size_at(0)),
        epochs=epochs,
        callbacks=[scheduler, *extra, recorder],
        verbose=0,
        shuffle=False,
        **kwargs,
    )
    return scheduler, recorder, history


# --------------------------------------------------------------------------
# Schedules and argument checks (no training).


def test_doubling_schedule_is_the_papers():
    assert doubling_schedule() == {0: 16, 40: 32, 80: 64, 120: 128, 160: 256}
    assert doubling_schedule(4, stages=3, epochs_per_stage=2) == {
        0: 4,
        2: 8,
        4: 16,
    }
    for bad in (
        dict(initial=0),
        dict(stages=-1),
        dict(epochs_per_stage=1.5),
        dict(initial=True),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            doubling_schedule(**bad)


def test_batch_size_at_and_steps_per_epoch():
    scheduler = BatchSizeScheduler(doubling_schedule(4, 3, 2), dataset_fn)
    assert [scheduler.batch_size_at(e) for e in range(8)] == [
        4,
        4,
        8,
        8,
        16,
        16,
        16,
        16,
    ]
    assert scheduler.steps_per_epoch(EPOCHS) == RAMP_STEPS
    assert scheduler.get_config() == {"schedule": RAMP, "relax_batch_shape": None}
    assert sorted(scheduler._cache._datasets) == [4, 8, 16]  # one per batch size

    by_callable = BatchSizeScheduler(lambda e: 8 if e % 2 else 4, dataset_fn)
    assert by_callable.steps_per_epoch(4) == [16, 8, 16, 8]
    assert by_callable.get_config() == {"schedule": None, "relax_batch_shape": None}
    with pytest.raises(ValueError, match="epochs"):
        scheduler.steps_per_epoch(0)


@pytest.mark.parametrize(
    "schedule",
    [
        {},
        [4, 8],
        "16",
        None,
        {0: 4.0},
        {0: "4"},
        {0: 0},
        {0: -8},
        {0: True},
        {0.0: 4},
        {"0": 4},
        {0: 4, -2: 8},
        {1: 4},
        {2: 4, 5: 8},
    ],
)
def test_bad_schedule_raises_naming_it(schedule):
    with pytest.raises(ValueError, match="`schedule`"):
        BatchSizeScheduler(schedule, dataset_fn)


@pytest.mark.parametrize("dataset_fn_arg", [None, "ds", dataset_fn(4)])
def test_dataset_fn_must_be_callable(dataset_fn_arg):
    with pytest.raises(ValueError, match="`dataset_fn`"):
        BatchSizeScheduler({0: 4}, dataset_fn_arg)


def _slices():
    return tf.data.Dataset.from_tensor_slices((X, Y))


@pytest.mark.parametrize(
    "bad_fn, match",
    [
        (lambda b: (X, Y), "tf.data.Dataset"),
        (lambda b: _slices(), "batched"),  # not batched
        (lambda b: _slices().batch(5, drop_remainder=True), "batched"),
        (lambda b: _slices().batch(b).repeat(), "infinite"),
        (lambda b: _slices().batch(b).filter(lambda x, y: True), "unknown"),
        (lambda b: _slices().take(2).batch(b, drop_remainder=True), "empty"),
    ],
)
def test_bad_dataset_fn_output(bad_fn, match):
    scheduler = BatchSizeScheduler({0: 4}, bad_fn)
    with pytest.raises(ValueError, match=match):
        scheduler.steps_per_epoch(1)


def test_assert_cardinality_rescues_a_filtered_dataset():
    def filtered(b):
        return (
            _slices()
            .filter(lambda x, y: True)
            .batch(b, drop_remainder=True)
            .apply(tf.data.experimental.assert_cardinality(N // b))
        )

    assert BatchSizeScheduler(RAMP, filtered).steps_per_epoch(5) == [
        16,
        16,
        8,
        8,
        4,
    ]


# --------------------------------------------------------------------------
# Checks made in on_train_begin, before any training step.


def _fails_before_training(model, match, schedule=RAMP, data=None, **kwargs):
    scheduler = BatchSizeScheduler(schedule, dataset_fn)
    if data is None:
        data = dataset_fn(4)
    with pytest.raises(ValueError, match=match):
        model.fit(data, epochs=EPOCHS, callbacks=[scheduler], verbose=0, shuffle=False, **kwargs)
    assert _iterations(model) == 0


def test_callable_schedule_checked_in_on_train_begin():
    model = _counting_model()
    _fails_before_training(model, "`schedule`", lambda e: 4 if e < 3 else 0)
    _fails_before_training(model, "`schedule`", lambda e: 4 if e < 3 else 8.0)


def test_fit_data_must_have_the_epoch_0_batch_size():
    model = _counting_model()
    _fails_before_training(model, "epoch 0", data=dataset_fn(8))
    # Unknown static batch size: the number of batches tells.
    dynamic_batch = tf.data.Dataset.from_tensor_slices((X, Y)).batch(8)
    _fails_before_training(model, "batches per epoch", data=dynamic_batch)
    _fails_before_training(model, "steps_per_epoch", steps_per_epoch=3)


def test_sam_num_batch_splits_checked_for_every_batch_size():
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model = SAMModel(inner, rho=0.05, num_batch_splits=8)  # 8 | 8, 16, not 4
    model.compile(optimizer="sgd", loss="mse")
    _fails_before_training(model, "num_batch_splits")


def test_replica_divisibility_checked_in_on_train_begin():
    strategy = mirrored(4)
    with strategy.scope():
        model = _counting_model()
    _fails_before_training(model, "not divisible by the number of replicas", schedule={0: 4, 2: 6})


def test_untested_keras_version_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_keras_compat, "TESTED_KERAS_VERSIONS", ((9, 0), (9, 1)))
    model = _counting_model()
    with pytest.raises(RuntimeError, match="BatchSizeScheduler"):
        model.fit(
            dataset_fn(4),
            epochs=2,
            verbose=0,
            shuffle=False,
            callbacks=[BatchSizeScheduler(RAMP, dataset_fn)],
        )


def test_outside_fit_is_a_clear_error():
    scheduler = BatchSizeScheduler(RAMP, dataset_fn)
    with pytest.raises(RuntimeError, match="fit"):
        scheduler.on_epoch_begin(0)


# --------------------------------------------------------------------------
# The Keras internals relied on, pinned.


def test_newer_untested_keras_warns_and_still_ramps(monkeypatch):
    monkeypatch.setattr(_keras_compat, "TESTED_KERAS_VERSIONS", ((3, 0), (3, 1)))
    monkeypatch.setattr(_keras_compat, "_warned", set())
    model = _counting_model()
    with pytest.warns(UserWarning, match="newer"):
        history = model.fit(
            dataset_fn(4),
            epochs=EPOCHS,
            verbose=0,
            shuffle=False,
            callbacks=[BatchSizeScheduler(RAMP, dataset_fn)],
        )
    assert history.history["batch_size"] == RAMP_SIZES


def test_moved_internals_are_a_clear_error_before_training(monkeypatch):
    monkeypatch.setattr(
        fit_loop,
        "EPOCH_ITERATOR_ATTRIBUTES",
        fit_loop.EPOCH_ITERATOR_ATTRIBUTES + ("_not_there",),
    )
    model = _counting_model()
    with pytest.raises(RuntimeError, match="_not_there"):
        model.fit(
            dataset_fn(4),
            epochs=2,
            verbose=0,
            shuffle=False,
            callbacks=[BatchSizeScheduler(RAMP, dataset_fn)],
        )
    assert _iterations(model) == 0


def test_pinned_keras_version_and_internals():
    low, _ = _keras_compat.TESTED_KERAS_VERSIONS
    assert low <= _keras_compat.keras_version(), keras.__version__

    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            fit = fit_loop.running_fit(self.model)
            seen["iterator"] = fit.epoch_iterator
            seen["callbacks"] = fit.callback_list
            seen["class_weight"] = fit.class_weight

    progbar = keras.callbacks.ProgbarLogger()
    model = _counting_model()
    model.fit(dataset_fn(4), epochs=1, verbose=0, shuffle=False, callbacks=[Probe(), progbar])

    iterator = seen["iterator"]
    names = fit_loop.EPOCH_ITERATOR_ATTRIBUTES + fit_loop.TF_EPOCH_ITERATOR_ATTRIBUTES
    missing = [name for name in names if not hasattr(iterator, name)]
    assert not missing, f"Keras {keras.__version__} moved {missing}"
    assert isinstance(
        iterator._distributed_dataset, (tf.data.Dataset, tf.distribute.DistributedDataset)
    )
    callback_list = seen["callbacks"]
    assert isinstance(callback_list, keras.callbacks.CallbackList)
    # fit shares one params dict between the callbacks (ProgbarLogger keeps
    # copies of its entries instead).
    assert all(
        cb.params is callback_list.params for cb in callback_list.callbacks if cb is not progbar
    )
    assert progbar.target == callback_list.params["steps"] == N // 4
    assert progbar in callback_list.callbacks
    assert hasattr(progbar, "target") and hasattr(progbar, "progbar")
    assert seen["class_weight"] is None


# --------------------------------------------------------------------------
# Training: exact counts.


@pytest.mark.parametrize("jit_compile", [False, True])
def test_exact_steps_iterations_shapes_and_traces(jit_compile):
    model = _counting_model(jit_compile=jit_compile)
    progbar = keras.callbacks.ProgbarLogger()
    probe = ProgbarProbe(progbar)
    schedule = {0: 4, 1: 8, 2: 16, 3: 8, 4: 4}  # goes back down, 3 sizes
    sizes = [4, 8, 16, 8, 4, 4]
    steps = [N // b for b in sizes]
    scheduler, recorder, history = _fit(model, schedule, extra=(progbar, probe))

    assert scheduler.steps_per_epoch(EPOCHS) == steps
    assert recorder.per_epoch(recorder.batches) == steps
    assert recorder.per_epoch(recorder.params_steps) == steps
    assert probe.targets == [(s, s) for s in steps]
    assert history.history["batch_size"] == sizes
    assert recorder.per_epoch(recorder.replica_batch) == [{b} for b in sizes]
    assert _iterations(model) == sum(steps)
    assert recorder.per_epoch(recorder.iterations) == list(np.cumsum(steps))
    assert 1 <= model.traces.n <= len(set(sizes))


@pytest.mark.parametrize("relax, traces", [(None, {1}), (False, {2, 3})])
def test_relaxed_batch_shape_traces_once_for_all_sizes(relax, traces):
    """By default the switch costs no retrace on TensorFlow; with static
    shapes the first switch retraces (TF relaxes the shape after the second
    one it sees, so 2 traces, at most one per distinct size)."""
    model = _counting_model()
    schedule = {0: 4, 1: 8, 2: 16, 3: 8, 4: 4}
    _, recorder, history = _fit(model, schedule, relax=relax)
    assert history.history["batch_size"] == [4, 8, 16, 8, 4, 4]
    assert model.traces.n in traces


def test_sub_batch_size_model_keeps_static_shapes():
    """A fixed sub-batch size needs the batch size at trace time."""
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model = keras_sam.SAMModel(inner, rho=0.05, sub_batch_size=2)
    model.compile(optimizer="sgd", loss="mse")
    scheduler = BatchSizeScheduler({0: 4, 1: 8}, dataset_fn)
    seen = []
    real = keras_sam.SAMModel.num_splits

    def spy(self, batch_size):
        seen.append(batch_size)
        return real(self, batch_size)

    keras_sam.SAMModel.num_splits = spy
    try:
        model.fit(dataset_fn(4), epochs=2, callbacks=[scheduler], verbose=0)
    finally:
        keras_sam.SAMModel.num_splits = real
    assert scheduler._relaxed() is False
    assert 4 in seen and 8 in seen  # traced with static per-replica batch sizes


def _tanh_net(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)]
    )


@pytest.mark.parametrize("relax", [None, True])
def test_sub_batch_size_splits_every_batch_size_into_batch_over_m(relax):
    """Batches of 4, 8 and 16 with sub_batch_size=2 get 2, 4 and 8
    sub-batches, however TF traced the step: the same weights as three
    separate fits, one per batch size."""
    schedule = {0: 4, 1: 8, 2: 16}
    model = SAMModel(_tanh_net(), rho=0.5, sub_batch_size=2)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    _fit(model, schedule, epochs=3, relax=relax)

    separate = SAMModel(_tanh_net(), rho=0.5, sub_batch_size=2)
    separate.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    for size in schedule.values():
        separate.fit(dataset_fn(size), epochs=1, verbose=0, shuffle=False)
    assert _iterations(model) == _iterations(separate) == 16 + 8 + 4
    for a, b in zip(model.trainable_variables, separate.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_progress_bar_listed_before_the_scheduler():
    # The ProgbarLogger has already made this epoch's bar when the scheduler
    # swaps the data: the bar's target is corrected too.
    model = _counting_model()
    progbar = keras.callbacks.ProgbarLogger()
    probe = ProgbarProbe(progbar)
    scheduler = BatchSizeScheduler({0: 8, 1: 16}, dataset_fn)
    model.fit(
        dataset_fn(8), epochs=2, verbose=0, shuffle=False, callbacks=[progbar, scheduler, probe]
    )
    assert probe.targets == [(8, 8), (4, 4)]


def test_class_weight_kept_after_a_switch():
    labels = (X[:, :1] > 0).astype("float32")

    def labelled_fn(batch_size):
        return tf.data.Dataset.from_tensor_slices((X, labels)).batch(
            batch_size, drop_remainder=True
        )

    weighted = []

    class SeesWeights(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            weighted.append(float(logs["weighted"]))

    model = _counting_model()
    model.fit(
        labelled_fn(8),
        epochs=2,
        verbose=0,
        shuffle=False,
        class_weight={0: 1.0, 1: 3.0},
        callbacks=[BatchSizeScheduler({0: 8, 1: 16}, labelled_fn), SeesWeights()],
    )
    assert weighted == [1.0] * (8 + 4)


def test_steps_per_execution():
    model = _counting_model(steps_per_execution=3)
    scheduler, recorder, history = _fit(model)
    iterations = [0] + recorder.per_epoch(recorder.iterations)
    assert list(np.diff(iterations)) == RAMP_STEPS
    assert recorder.per_epoch(recorder.batches) == [-(-s // 3) for s in RAMP_STEPS]
    assert history.history["batch_size"] == RAMP_SIZES
    assert _iterations(model) == sum(RAMP_STEPS)


def test_learning_rate_schedule_follows_the_epochs():
    scheduler = BatchSizeScheduler(RAMP, dataset_fn)
    model = _counting_model(lr=EpochLR(scheduler.steps_per_epoch(EPOCHS)))
    recorder = Recorder()
    model.fit(
        dataset_fn(4), epochs=EPOCHS, callbacks=[scheduler, recorder], verbose=0, shuffle=False
    )
    np.testing.assert_allclose(
        recorder.per_epoch(recorder.lr),
        [0.05 / (e + 1) for e in range(EPOCHS)],
        rtol=1e-6,
    )
    assert _iterations(model) == sum(RAMP_STEPS)


@pytest.mark.parametrize("replicas", [2, 4])
def test_mirrored_strategy(replicas):
    with mirrored(replicas).scope():
        model = _counting_model()
    sizes = [8, 16]
    steps = [N // b for b in sizes]
    scheduler, recorder, history = _fit(model, {0: 8, 1: 16}, epochs=2)
    assert recorder.per_epoch(recorder.batches) == steps
    assert recorder.per_epoch(recorder.params_steps) == steps
    assert _iterations(model) == sum(steps)
    assert recorder.per_epoch(recorder.replica_batch) == [{b // replicas} for b in sizes]
    assert history.history["batch_size"] == sizes
    # strategy.run traces train_step once per replica per trace.
    assert model.traces.n <= len(sizes) * replicas


@pytest.mark.parametrize("model_cls", [SAMModel, GSAMModel])
def test_sam_models_run_the_exact_steps(model_cls):
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model = model_cls(inner, rho=0.05, num_batch_splits=2)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    sizes = [4, 8, 16]
    steps = [N // b for b in sizes]
    scheduler, recorder, history = _fit(model, {0: 4, 1: 8, 2: 16}, epochs=3)
    assert recorder.per_epoch(recorder.batches) == steps
    assert _iterations(model) == sum(steps)
    assert history.history["batch_size"] == sizes
    assert np.all(np.isfinite(history.history["loss"]))


# --------------------------------------------------------------------------
# With Keras' own callbacks.


def test_with_validation_and_keras_callbacks(tmp_path):
    model = _counting_model()
    csv_path = str(tmp_path / "log.csv")
    ckpt = str(tmp_path / "ckpt-{epoch:02d}.weights.h5")
    # batch_size per epoch: 4, 4, 8, 8, 8, ...; with mode="max" and
    # patience=2 EarlyStopping stops after epoch 4 (0-based).
    callbacks = [
        keras.callbacks.CSVLogger(csv_path),
        keras.callbacks.ModelCheckpoint(ckpt, save_weights_only=True),
        keras.callbacks.EarlyStopping(monitor="batch_size", mode="max", patience=2),
    ]
    scheduler, recorder, history = _fit(
        model,
        {0: 4, 2: 8},
        epochs=10,
        extra=callbacks,
        validation_data=val_dataset(),
    )
    sizes = [4, 4, 8, 8, 8]
    steps = [N // b for b in sizes]
    assert history.history["batch_size"] == sizes
    assert len(history.history["val_loss"]) == 5
    assert np.all(np.isfinite(history.history["val_loss"]))
    assert callbacks[-1].stopped_epoch == 4
    assert recorder.per_epoch(recorder.batches) == steps
    assert _iterations(model) == sum(steps)

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["batch_size"])) for r in rows] == sizes
    assert [int(r["epoch"]) for r in rows] == list(range(5))
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["log.csv"] + [f"ckpt-{e:02d}.weights.h5" for e in range(1, 6)]
    )


def test_with_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")  # tf.summary needs it
    model = _counting_model()
    scheduler, recorder, history = _fit(
        model,
        {0: 8, 1: 16},
        epochs=2,
        extra=[keras.callbacks.TensorBoard(str(tmp_path / "tb"))],
        validation_data=val_dataset(),
    )
    assert history.history["batch_size"] == [8, 16]
    assert recorder.per_epoch(recorder.batches) == [8, 4]
    assert os.listdir(tmp_path / "tb" / "train")
    assert os.listdir(tmp_path / "tb" / "validation")


def _resume_model(seed):
    keras.utils.set_random_seed(seed)
    inner = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)]
    )
    return inner


def _compile(model, steps):
    model.compile(optimizer=keras.optimizers.SGD(EpochLR(steps)), loss="mse")
    return model


def test_resume_with_backup_and_restore(tmp_path):
    steps = BatchSizeScheduler(RAMP, dataset_fn).steps_per_epoch(EPOCHS)

    # Uninterrupted run.
    model = _compile(_resume_model(1), steps)
    scheduler = BatchSizeScheduler(RAMP, dataset_fn)
    straight = Recorder()
    model.fit(
        dataset_fn(4), epochs=EPOCHS, verbose=0, shuffle=False, callbacks=[scheduler, straight]
    )
    expected = [w.copy() for w in model.get_weights()]

    # Interrupted at the start of epoch 3 (mid-ramp), then fit again with the
    # same callbacks on a freshly built model (as after a crash).
    scheduler = BatchSizeScheduler(RAMP, dataset_fn)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    resumed = Recorder()
    callbacks = [scheduler, backup, resumed, InterruptAt(3)]
    model = _compile(_resume_model(1), steps)
    with pytest.raises(Interrupt):
        model.fit(dataset_fn(4), epochs=EPOCHS, verbose=0, shuffle=False, callbacks=callbacks)
    assert _iterations(model) == sum(steps[:3])

    model = _compile(_resume_model(2), steps)  # different initial weights
    history = model.fit(dataset_fn(4), epochs=EPOCHS, verbose=0, shuffle=False, callbacks=callbacks)

    assert history.epoch == [3, 4, 5]
    assert history.history["batch_size"] == RAMP_SIZES[3:]
    assert resumed.batches == straight.batches  # epochs 0-2, then 3-5
    assert resumed.per_epoch(resumed.batch_size) == RAMP_SIZES
    assert resumed.per_epoch(resumed.iterations) == straight.per_epoch(straight.iterations)
    np.testing.assert_allclose(
        resumed.per_epoch(resumed.lr),
        straight.per_epoch(straight.lr),
        rtol=1e-6,
    )
    assert _iterations(model) == sum(steps)
    for got, want in zip(model.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# A run continued by hand: a second fit() with initial_epoch, given the data
# of epoch 0's batch size or of initial_epoch's.
@pytest.mark.parametrize("start", [3, 4])
@pytest.mark.parametrize("second_data", ["epoch_0", "initial_epoch"])
def test_fit_again_with_initial_epoch_continues_like_one_run(start, second_data):
    steps = BatchSizeScheduler(RAMP, dataset_fn).steps_per_epoch(EPOCHS)
    model = _compile(_resume_model(1), steps)
    straight = Recorder()
    model.fit(
        dataset_fn(4),
        epochs=EPOCHS,
        verbose=0,
        shuffle=False,
        callbacks=[BatchSizeScheduler(RAMP, dataset_fn), straight],
    )
    expected = [w.copy() for w in model.get_weights()]

    model = _compile(_resume_model(1), steps)
    by_hand = Recorder()
    scheduler = BatchSizeScheduler(RAMP, dataset_fn)
    model.fit(dataset_fn(4), epochs=start, verbose=0, shuffle=False, callbacks=[scheduler, by_hand])
    size = RAMP_SIZES[start] if second_data == "initial_epoch" else RAMP_SIZES[0]
    history = model.fit(
        dataset_fn(size),
        epochs=EPOCHS,
        initial_epoch=start,
        verbose=0,
        shuffle=False,
        callbacks=[scheduler, by_hand],
    )
    assert history.epoch == list(range(start, EPOCHS))
    assert history.history["batch_size"] == RAMP_SIZES[start:]
    assert by_hand.batches == straight.batches
    assert by_hand.per_epoch(by_hand.iterations) == straight.per_epoch(straight.iterations)
    for got, want in zip(model.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_fit_with_initial_epoch_refuses_data_of_another_batch_size():
    model = _counting_model()
    scheduler = BatchSizeScheduler(RAMP, dataset_fn)
    before = model.get_weights()
    with pytest.raises(ValueError, match="gives 4 at epoch 0 and 16 at initial_epoch=4"):
        model.fit(dataset_fn(8), epochs=EPOCHS, initial_epoch=4, callbacks=[scheduler], verbose=0)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# NumPy integers: the same schedule as with Python ints.


@pytest.mark.parametrize("int_type", [np.int32, np.int64, np.uint8])
def test_numpy_int_schedule_is_the_same(int_type):
    assert doubling_schedule(int_type(4), int_type(3), int_type(2)) == RAMP
    assert all(
        type(k) is int and type(v) is int
        for k, v in doubling_schedule(int_type(4), int_type(3), int_type(2)).items()
    )
    expected = BatchSizeScheduler(RAMP, dataset_fn)
    schedules = [
        {int_type(k): int_type(v) for k, v in RAMP.items()},
        doubling_schedule(int_type(4), int_type(3), int_type(2)),
    ]
    for schedule in schedules:
        scheduler = BatchSizeScheduler(schedule, dataset_fn, np.bool_(True))
        assert scheduler.relax_batch_shape is True
        config = scheduler.get_config()
        assert config == {**expected.get_config(), "relax_batch_shape": True}
        assert json.loads(json.dumps(config))["schedule"] == {str(k): v for k, v in RAMP.items()}
        sizes = [scheduler.batch_size_at(int_type(e)) for e in range(EPOCHS)]
        assert sizes == RAMP_SIZES and all(type(b) is int for b in sizes)
        assert scheduler.steps_per_epoch(int_type(EPOCHS)) == RAMP_STEPS

    by_callable = BatchSizeScheduler(lambda e: int_type(RAMP_SIZES[e]), dataset_fn)
    assert by_callable.steps_per_epoch(np.array(EPOCHS)) == RAMP_STEPS
    assert type(by_callable.batch_size_at(np.array(0))) is int


@pytest.mark.parametrize(
    "schedule",
    [
        {np.int64(0): np.float32(4.0)},
        {np.float64(0.0): 4},
        {0: np.bool_(True)},
        {np.int64(0): 4, np.int64(-2): 8},
    ],
    ids=repr,
)
def test_numpy_bad_schedule_still_rejected(schedule):
    with pytest.raises(ValueError, match="`schedule` must be"):
        BatchSizeScheduler(schedule, dataset_fn)


def test_relax_batch_shape_is_none_true_or_false():
    with pytest.raises(ValueError, match="`relax_batch_shape` must be one of"):
        BatchSizeScheduler(RAMP, dataset_fn, relax_batch_shape="yes")
