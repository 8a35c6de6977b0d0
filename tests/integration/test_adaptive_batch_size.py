"""AdaptiveBatchSize: the batch grows at an epoch's end when the measured
noise scale says so, through BatchSizeScheduler.

The rule against a table; the decisions against the rule replayed on the
logged noise scales, and the weights against a float64 SGD replay with the
epoch-axis cosine rate over the batches actually drawn, on every backend
(tests/support/noise_scale_check.py); resuming with BackupAndRestore against an
uninterrupted run; the errors before the first step.
"""

import os

import keras
import noise_scale_check as check  # noqa: E402
import numpy as np
import pytest
from conftest import NOISE_SCALE_RUNS  # noqa: E402
from growing_batch_data import D
from growing_batch_data import N
from growing_batch_data import dataset_fn
from growing_batch_data import mlp
from interrupts import Interrupt  # noqa: E402
from interrupts import InterruptAt  # noqa: E402

import keras_sam
from keras_sam.callbacks import AdaptiveBatchSize
from keras_sam.callbacks import BatchSizeScheduler
from keras_sam.callbacks.adaptive_batch_size import next_batch_size

tf = pytest.importorskip("tensorflow")  # the pipelines are tf.data


# ------------------------------------------------------------------ the rule
@pytest.mark.parametrize(
    "batch, noise, since, want",
    [
        (16, 15.9, 1, 16),  # below threshold * batch
        (16, 16.0, 1, 32),  # at it
        (16, float("inf"), 1, 32),  # all noise
        (128, 1e9, 1, 200),  # capped at max_batch_size
        (200, 1e9, 1, 200),  # at the cap
        (16, 1e9, 0, 16),  # the min_epochs gap (1 here) not reached
    ],
)
def test_rule(batch, noise, since, want):
    policy = AdaptiveBatchSize(16, max_batch_size=200, factor=2, threshold=1.0)
    assert next_batch_size(batch, noise, since, policy) == want


def test_threshold_factor_and_min_epochs():
    policy = AdaptiveBatchSize(4, max_batch_size=64, factor=4, threshold=0.5, min_epochs=3)
    assert policy.reachable_batch_sizes() == [4, 16, 64]
    assert [policy.decide(e, 2.0) for e in range(4)] == [4, 4, 16, 16]  # 2 >= 0.5 * 4
    assert policy.history == {0: 4, 3: 16}
    assert [policy(e) for e in range(6)] == [4, 4, 4, 16, 16, 16]
    policy.forget_after(2)
    assert policy.history == {0: 4}
    config = BatchSizeScheduler(policy, lambda b: None).get_config()
    assert config["schedule"] == {"adaptive": policy.get_config()}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(initial_batch_size=0, max_batch_size=8), "initial_batch_size"),
        (dict(initial_batch_size=16, max_batch_size=8), "max_batch_size"),
        (dict(initial_batch_size=8, max_batch_size=64, factor=1), "factor"),
        (dict(initial_batch_size=8, max_batch_size=64, factor=1.5), "factor"),
        (dict(initial_batch_size=8, max_batch_size=64, threshold=0), "threshold"),
        (dict(initial_batch_size=8, max_batch_size=64, min_epochs=0), "min_epochs"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        AdaptiveBatchSize(**kwargs)


# ------------------------------------------------ every backend, replayed
def replay_kernel(batch_sizes):
    """Plain SGD on (x.w - y)^2 from w = 0 over the epochs' batches in order,
    the rate `CosineAnnealing` gives at each step's fractional epoch."""
    x, y = (a.astype(np.float64) for a in check.adaptive_data())
    w = np.zeros(check.D)
    epochs = check.ADAPTIVE_EPOCHS
    for epoch, b in enumerate(batch_sizes):
        steps = len(x) // b
        for k in range(steps):
            p = min((epoch + k / steps) / epochs, 1.0)
            lr = check.LR_FINAL + (check.LR - check.LR_FINAL) * (1 + np.cos(np.pi * p)) / 2
            xb, yb = x[k * b : (k + 1) * b], y[k * b : (k + 1) * b, 0]
            w -= lr * np.mean(2 * (xb @ w - yb)[:, None] * xb, axis=0)
    return w


@pytest.mark.parametrize("backend", sorted({b for b, parallel in NOISE_SCALE_RUNS}))
def test_decisions_follow_the_rule_and_weights_the_replay(noise_scale_backends, backend):
    if (backend, False) not in noise_scale_backends:
        pytest.skip(f"{backend} is not installed")
    got = noise_scale_backends[(backend, False)]["adaptive"]
    sizes, decided, noise = got["batch_size"], got["next_batch_size"], got["noise_scale"]
    policy = AdaptiveBatchSize(
        4, max_batch_size=64, threshold=check.THRESHOLD, min_epochs=check.MIN_EPOCHS
    )
    last_change = 0
    for epoch, (b, ns) in enumerate(zip(sizes, noise)):
        assert decided[epoch] == next_batch_size(b, ns, epoch + 1 - last_change, policy)
        if epoch + 1 < len(sizes):
            assert sizes[epoch + 1] == decided[epoch]
            if sizes[epoch + 1] != b:
                last_change = epoch + 1
    # The run holds both kinds of decision, and the epoch-axis rate followed
    # the batches actually drawn (a rate sized from batch 4 would not).
    assert len(set(sizes)) >= 3 and any(a == b for a, b in zip(sizes, decided))
    np.testing.assert_allclose(got["kernel"], replay_kernel(sizes), rtol=1e-4, atol=1e-6)
    reference = noise_scale_backends[("tensorflow", False)]["adaptive"]
    assert sizes == reference["batch_size"]


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_backup_and_restore_resumes_like_the_uninterrupted_run(noise_scale_backends, backend):
    """Stopped at the start of an epoch and resumed by a model built anew, the
    run logs the uninterrupted run's batch sizes, decisions and noise scales
    from there on and ends with its weights, on every backend."""
    if (backend, False) not in noise_scale_backends:
        pytest.skip(f"{backend} is not installed")
    full = noise_scale_backends[(backend, False)]["adaptive"]
    rest = noise_scale_backends[(backend, False)]["adaptive_resumed"]
    k = check.RESUME_EPOCH
    assert len(set(full["batch_size"][:k])) >= 2 and len(set(full["batch_size"][k:])) >= 2
    assert rest["batch_size"] == full["batch_size"][k:]
    assert rest["next_batch_size"] == full["next_batch_size"][k:]
    np.testing.assert_allclose(rest["noise_scale"], full["noise_scale"][k:], rtol=1e-6)
    np.testing.assert_allclose(rest["kernel"], full["kernel"], rtol=1e-6, atol=1e-7)


# --------------------------------------------- in this process (TensorFlow)
EPOCHS = 8


def build(noise_scale=True, steps=None, **policy_kwargs):
    """A SAM MLP with a cosine rate over the scheduler's steps."""
    policy = AdaptiveBatchSize(4, max_batch_size=32, threshold=0.2, **policy_kwargs)
    scheduler = BatchSizeScheduler(policy, dataset_fn)
    inner = mlp()
    steps = scheduler.steps_per_epoch(EPOCHS) if steps is None else steps
    lr = keras_sam.schedules.CosineAnnealing(0.05, 0.001, EPOCHS, steps)
    model = keras_sam.SAMModel(inner, rho=0.05, noise_scale=noise_scale, noise_scale_decay=0.8)
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9), loss="mse")
    return model, scheduler, policy


def fit(model, scheduler, *callbacks):
    return model.fit(
        dataset_fn(4), epochs=EPOCHS, callbacks=[scheduler, *callbacks], shuffle=False, verbose=0
    )


def test_backup_and_restore_resumes_the_decisions(tmp_path):
    model, scheduler, _ = build()
    full = fit(model, scheduler).history
    assert len(set(full["batch_size"])) >= 3, full["batch_size"]  # it grew, twice at least

    backup = str(tmp_path / "backup")
    interrupted, scheduler, _ = build()
    with pytest.raises(Interrupt):
        fit(interrupted, scheduler, keras.callbacks.BackupAndRestore(backup), InterruptAt(5))
    assert os.path.exists(os.path.join(backup, AdaptiveBatchSize.STATE_FILE))
    resumed, scheduler, policy = build()  # a new process would build everything anew
    rest = fit(resumed, scheduler, keras.callbacks.BackupAndRestore(backup)).history
    for key in ("batch_size", "next_batch_size", "noise_scale", "loss"):
        np.testing.assert_allclose(rest[key], full[key][5:], rtol=1e-6, err_msg=key)
    for a, b in zip(resumed.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert scheduler.steps_per_epoch(EPOCHS) == [N // b for b in full["batch_size"]]
    assert keras_sam.schedules.steps_per_epoch(N, policy, EPOCHS) == [
        N // b for b in full["batch_size"]
    ]


def test_a_model_without_the_estimate_is_refused_before_training():
    model, scheduler, _ = build(noise_scale=False)
    before = model.get_weights()
    with pytest.raises(ValueError, match="noise_scale=True"):
        fit(model, scheduler)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_a_rate_sized_for_other_steps_is_refused_before_training():
    model, scheduler, _ = build(steps=[N // 8] * EPOCHS)
    with pytest.raises(ValueError, match="steps_per_epoch=scheduler.steps_per_epoch"):
        fit(model, scheduler)


def test_decisions_of_another_policy_are_not_mixed_in(tmp_path):
    backup = str(tmp_path / "backup")
    model, scheduler, _ = build()
    with pytest.raises(Interrupt):
        fit(model, scheduler, keras.callbacks.BackupAndRestore(backup), InterruptAt(3))
    model, scheduler, _ = build(min_epochs=2)
    with pytest.raises(ValueError, match="another AdaptiveBatchSize"):
        fit(model, scheduler, keras.callbacks.BackupAndRestore(backup))


def test_every_reachable_batch_size_is_checked_for_the_replicas():
    from strategies import mirrored

    strategy = mirrored(2)
    with strategy.scope():
        inner = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1)])
        model = keras_sam.SAMModel(inner, rho=0.05, noise_scale=True)
        model.compile(optimizer="sgd", loss="mse")
    policy = AdaptiveBatchSize(4, max_batch_size=30)  # 4, 8, 16, 30: 30 / 2 replicas is fine
    fit_data = dataset_fn(4)
    model.fit(fit_data, epochs=1, callbacks=[BatchSizeScheduler(policy, dataset_fn)], verbose=0)
    policy = AdaptiveBatchSize(4, max_batch_size=31)
    with pytest.raises(ValueError, match=r"31 \(reachable by the AdaptiveBatchSize\)"):
        model.fit(fit_data, epochs=1, callbacks=[BatchSizeScheduler(policy, dataset_fn)])


def test_backup_and_restore_listed_before_the_scheduler_is_refused(tmp_path):
    model, scheduler, _ = build()
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(ValueError, match="before the BackupAndRestore"):
        model.fit(dataset_fn(4), epochs=EPOCHS, callbacks=[backup, scheduler], verbose=0)


def test_a_rate_built_for_a_longer_horizon_is_accepted():
    """The rate planned for 2 x EPOCHS, trained EPOCHS at a time."""
    model, scheduler, _ = build(steps=None)
    policy = AdaptiveBatchSize(4, max_batch_size=32, threshold=0.2)
    scheduler = BatchSizeScheduler(policy, dataset_fn)
    lr = keras_sam.schedules.CosineAnnealing(
        0.05, 0.001, 2 * EPOCHS, scheduler.steps_per_epoch(2 * EPOCHS)
    )
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    history = model.fit(dataset_fn(4), epochs=EPOCHS, callbacks=[scheduler], verbose=0)
    assert lr.epoch_steps[:EPOCHS] == [N // b for b in history.history["batch_size"]]
