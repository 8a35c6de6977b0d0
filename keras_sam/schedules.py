"""Epoch-aware learning rate schedules, for training whose batch size changes.

Keras' built-in schedules are functions of the optimizer's step count. When the
batch size grows during training (16, 32, 64, ... as in Harada & Iiduka), an
epoch no longer has a fixed number of steps, and a step-based schedule sized
from the first batch size ends far from its final value. The schedules here are
functions of the FRACTIONAL EPOCH instead:

    epoch(step) = e + (step - start_e) / steps_e     for start_e <= step < start_{e+1}

where `steps_e` is the number of steps of epoch `e` (an int, or one int per
epoch, see `steps_per_epoch()`) and `start_e` their running sum. The rate at
the first step of epoch `e` is therefore the closed form at `e`, whatever the
batch sizes were. With progress `p = (epoch - warmup_epochs) /
(epochs - warmup_epochs)` clipped to [0, 1]:

    warmup  (epoch < warmup_epochs)  initial * epoch / warmup_epochs
    CosineAnnealing                  final + (initial - final) * (1 + cos(pi p)) / 2
    LinearDecay                      initial + (final - initial) * p
    PolynomialDecay                  final + (initial - final) * (1 - p) ** power
    ExponentialDecay                 initial * (final / initial) ** p
    Constant                         initial

and the rate stays at `final` after `epochs`. `step` is the optimizer's update
count read before it is incremented, so step 0 is the first update (one count
per `optimizer.apply`, i.e. per SAM step). Everything is written with
`keras.ops` in float32 and traces under `tf.function` / `jax.jit`.
"""

import math

import keras
from keras import ops

from keras_sam import _validation
from keras_sam.batch_schedule import BatchSchedule

__all__ = [
    "CosineAnnealing",
    "LinearDecay",
    "PolynomialDecay",
    "ExponentialDecay",
    "Constant",
    "steps_per_epoch",
]


# --------------------------------------------------------------------------
# Argument checks (`keras_sam._validation`: ValueError naming the argument).

_STEPS = "an int >= 1 or a non-empty list of ints >= 1 (one per epoch)"


def _check_steps(value):
    """`steps_per_epoch` as given (int or list of ints) -> (config value, list)."""
    steps = _validation.as_int(value)
    if steps is not None and steps > 0:
        return steps, [steps]
    if isinstance(value, (list, tuple)) and value:
        steps = [_validation.as_int(s) for s in value]
        if all(s is not None and s > 0 for s in steps):
            return steps, steps
    raise _validation.error("steps_per_epoch", _STEPS, value)


# --------------------------------------------------------------------------
# The shared machinery.


class _EpochSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Base class: step -> fractional epoch -> warmup, then `_decay(p)`.

    A subclass only defines `_decay(self, p)`: the rate at progress
    `p in [0, 1]` (a float32 tensor), from `self.initial_learning_rate` at
    `p = 0` to `self.final_learning_rate` at `p = 1`.
    """

    _needs_horizon = True  # Constant may go without epochs / steps_per_epoch

    def __init__(
        self,
        initial_learning_rate,
        final_learning_rate,
        epochs,
        steps_per_epoch,
        warmup_epochs=0,
    ):
        self.initial_learning_rate = _validation.real(
            "initial_learning_rate", initial_learning_rate, low=0, low_inclusive=False
        )
        self.final_learning_rate = _validation.real(
            "final_learning_rate", final_learning_rate, low=0
        )
        self.epochs = _validation.integer(
            "epochs", epochs, low=1, allow_none=not self._needs_horizon
        )
        warmup = _validation.real(
            "warmup_epochs",
            warmup_epochs,
            low=0,
            high=self.epochs,
            high_inclusive=False,
        )
        # An int stays an int (in the config too).
        as_int = _validation.as_int(warmup_epochs)
        self.warmup_epochs = warmup if as_int is None else as_int
        if steps_per_epoch is None and (self._needs_horizon or warmup > 0):
            raise _validation.error("steps_per_epoch", _STEPS, None)
        self.steps_per_epoch = None
        self._steps = None  # steps of epochs 0..n-1; the last one repeats after
        if steps_per_epoch is not None:
            self.steps_per_epoch, steps = _check_steps(steps_per_epoch)
            # Past `epochs` the rate is constant, so later entries never matter.
            self._steps = steps[: self.epochs] if self.epochs else steps

    @property
    def epoch_steps(self):
        """The steps of each epoch the schedule maps step counts with (the
        last one repeats after them), or None without `steps_per_epoch`."""
        return None if self._steps is None else list(self._steps)

    def set_epoch_steps(self, steps):
        """Replaces the steps of each epoch (`BatchSizeScheduler` does, when a
        policy grows the batch); returns whether they changed."""
        config, steps = _check_steps(steps)
        steps = steps[: self.epochs] if self.epochs else steps
        if self._steps == steps:
            return False
        self.steps_per_epoch, self._steps = config, steps
        return True

    @property
    def max_learning_rate(self):
        """Largest rate of the schedule, warmup start excluded."""
        return max(self.initial_learning_rate, self.final_learning_rate)

    @property
    def min_learning_rate(self):
        """Smallest rate of the schedule, warmup start excluded."""
        return min(self.initial_learning_rate, self.final_learning_rate)

    def fractional_epoch(self, step):
        """The fractional epoch at optimizer step `step` (float32 tensor).

        Args:
            step: int or tensor of optimizer steps (any shape); step 0 is the
                first update.

        Returns:
            A float32 tensor of the shape of `step`: `e + (step - start_e) /
            steps_e`, extrapolated with the last listed epoch length. Step
            counts are exact in float32 up to 2**24 (16.7M) steps.
        """
        if self._steps is None:
            raise ValueError("`steps_per_epoch` is needed to map steps to epochs; received: None")
        step = ops.cast(step, "float32")
        starts = [0]
        for s in self._steps[:-1]:
            starts.append(starts[-1] + s)
        # Index of the current epoch = number of later epoch starts reached
        # (comparison and sum: `ops.searchsorted` with a scalar fails on TF).
        index = ops.zeros_like(step, dtype="int32")
        if len(starts) > 1:
            later_starts = ops.convert_to_tensor(starts[1:], dtype="float32")
            reached = ops.greater_equal(ops.expand_dims(step, -1), later_starts)
            index = ops.sum(ops.cast(reached, "int32"), axis=-1)
        start = ops.take(ops.convert_to_tensor(starts, dtype="float32"), index)
        length = ops.take(ops.convert_to_tensor(self._steps, dtype="float32"), index)
        epoch = ops.cast(index, "float32") + (step - start) / length
        return ops.maximum(epoch, 0.0)

    def __call__(self, step):
        if self._steps is None:  # Constant without warmup: no epochs needed
            return ops.full_like(ops.cast(step, "float32"), self.initial_learning_rate)
        epoch = self.fractional_epoch(step)
        if self.epochs is None:
            progress = ops.zeros_like(epoch)
        else:
            progress = (epoch - self.warmup_epochs) / (self.epochs - self.warmup_epochs)
            progress = ops.clip(progress, 0.0, 1.0)
        rate = self._decay(progress)
        if self.warmup_epochs > 0:
            warm = self.initial_learning_rate * epoch / self.warmup_epochs
            rate = ops.where(epoch < self.warmup_epochs, warm, rate)
        return rate

    def _decay(self, p):
        raise NotImplementedError

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "final_learning_rate": self.final_learning_rate,
            "epochs": self.epochs,
            "steps_per_epoch": (
                list(self.steps_per_epoch)
                if isinstance(self.steps_per_epoch, list)
                else self.steps_per_epoch
            ),
            "warmup_epochs": self.warmup_epochs,
        }

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


# --------------------------------------------------------------------------
# The schedules: each is its decay formula.


@keras.saving.register_keras_serializable(package="keras_sam")
class CosineAnnealing(_EpochSchedule):
    """Cosine annealing over epochs, with optional linear warmup.

    After warmup the rate follows
    `final + (initial - final) * (1 + cos(pi * p)) / 2` with progress
    `p = (epoch - warmup_epochs) / (epochs - warmup_epochs)`, where `epoch` is
    the fractional epoch of the optimizer step; it stays at `final` after
    `epochs`.

    Args:
        initial_learning_rate: float > 0, the rate at the end of warmup.
        final_learning_rate: float >= 0, the rate at epoch `epochs` and after.
        epochs: positive int, the epoch at which the decay ends.
        steps_per_epoch: positive int, or a list of positive ints giving the
            number of optimizer steps of each epoch (see `steps_per_epoch()`);
            a list shorter than `epochs` repeats its last entry.
        warmup_epochs: number in `[0, epochs)`, default 0. The rate rises
            linearly from 0 at step 0 to `initial_learning_rate` over this many
            (fractional) epochs.

    Returns:
        A `LearningRateSchedule`; called with the optimizer's step count it
        returns the float32 learning rate.

    Example:

    ```python
    steps = keras_sam.schedules.steps_per_epoch(
        50000, {0: 16, 40: 32, 80: 64, 120: 128, 160: 256}, epochs=200
    )
    lr = keras_sam.schedules.CosineAnnealing(0.1, 0.001, 200, steps)
    optimizer = keras.optimizers.SGD(learning_rate=lr)
    ```
    """

    def _decay(self, p):
        initial, final = self.initial_learning_rate, self.final_learning_rate
        return final + (initial - final) * (1.0 + ops.cos(math.pi * p)) / 2.0


@keras.saving.register_keras_serializable(package="keras_sam")
class LinearDecay(_EpochSchedule):
    """Linear decay over epochs, with optional linear warmup.

    After warmup the rate follows `initial + (final - initial) * p`, with `p`
    the progress through the decay epochs (see `CosineAnnealing`).

    Args:
        initial_learning_rate: float > 0, the rate at the end of warmup.
        final_learning_rate: float >= 0, the rate at epoch `epochs` and after.
        epochs: positive int, the epoch at which the decay ends.
        steps_per_epoch: positive int or list of positive ints, steps of each
            epoch (a short list repeats its last entry).
        warmup_epochs: number in `[0, epochs)`, default 0.

    Returns:
        A `LearningRateSchedule`.

    Example:

    ```python
    lr = keras_sam.schedules.LinearDecay(
        0.1, 0.0, epochs=200, steps_per_epoch=[390] * 100 + [195] * 100
    )
    ```
    """

    def _decay(self, p):
        initial, final = self.initial_learning_rate, self.final_learning_rate
        return initial + (final - initial) * p


@keras.saving.register_keras_serializable(package="keras_sam")
class PolynomialDecay(_EpochSchedule):
    """Polynomial decay over epochs, with optional linear warmup.

    After warmup the rate follows `final + (initial - final) * (1 - p) ** power`,
    with `p` the progress through the decay epochs (see `CosineAnnealing`).

    Args:
        initial_learning_rate: float > 0, the rate at the end of warmup.
        final_learning_rate: float >= 0, the rate at epoch `epochs` and after.
        epochs: positive int, the epoch at which the decay ends.
        steps_per_epoch: positive int or list of positive ints, steps of each
            epoch (a short list repeats its last entry).
        warmup_epochs: number in `[0, epochs)`, default 0.
        power: float > 0, default 1.0 (linear decay).

    Returns:
        A `LearningRateSchedule`.

    Example:

    ```python
    lr = keras_sam.schedules.PolynomialDecay(
        0.1, 0.0, epochs=200, steps_per_epoch=390, power=2.0
    )
    ```
    """

    def __init__(
        self,
        initial_learning_rate,
        final_learning_rate,
        epochs,
        steps_per_epoch,
        warmup_epochs=0,
        power=1.0,
    ):
        super().__init__(
            initial_learning_rate,
            final_learning_rate,
            epochs,
            steps_per_epoch,
            warmup_epochs,
        )
        self.power = _validation.real("power", power, low=0, low_inclusive=False)

    def _decay(self, p):
        initial, final = self.initial_learning_rate, self.final_learning_rate
        return final + (initial - final) * ops.power(1.0 - p, self.power)

    def get_config(self):
        return {**super().get_config(), "power": self.power}


@keras.saving.register_keras_serializable(package="keras_sam")
class ExponentialDecay(_EpochSchedule):
    """Exponential (geometric) decay over epochs, with optional linear warmup.

    After warmup the rate follows `initial * (final / initial) ** p`, with `p`
    the progress through the decay epochs (see `CosineAnnealing`).

    Args:
        initial_learning_rate: float > 0, the rate at the end of warmup.
        final_learning_rate: float > 0 (not 0 here), the rate at epoch
            `epochs` and after.
        epochs: positive int, the epoch at which the decay ends.
        steps_per_epoch: positive int or list of positive ints, steps of each
            epoch (a short list repeats its last entry).
        warmup_epochs: number in `[0, epochs)`, default 0.

    Returns:
        A `LearningRateSchedule`.

    Example:

    ```python
    lr = keras_sam.schedules.ExponentialDecay(
        0.1, 0.001, epochs=200, steps_per_epoch=390, warmup_epochs=5
    )
    ```
    """

    def __init__(
        self,
        initial_learning_rate,
        final_learning_rate,
        epochs,
        steps_per_epoch,
        warmup_epochs=0,
    ):
        _validation.real(  # > 0 here
            "final_learning_rate", final_learning_rate, low=0, low_inclusive=False
        )
        super().__init__(
            initial_learning_rate,
            final_learning_rate,
            epochs,
            steps_per_epoch,
            warmup_epochs,
        )

    def _decay(self, p):
        initial, final = self.initial_learning_rate, self.final_learning_rate
        return initial * ops.power(final / initial, p)


@keras.saving.register_keras_serializable(package="keras_sam")
class Constant(_EpochSchedule):
    """A constant learning rate, with optional linear warmup.

    The "+B" setting of Harada & Iiduka: the rate stays fixed while the batch
    size grows. `final_learning_rate` equals `initial_learning_rate`.

    Args:
        initial_learning_rate: float > 0, the rate (after warmup).
        epochs: optional positive int, the length of training; only checked
            against `warmup_epochs`.
        steps_per_epoch: positive int or list of positive ints, as for
            `CosineAnnealing`; needed only with `warmup_epochs > 0`.
        warmup_epochs: number >= 0 (and < `epochs` when given), default 0.

    Returns:
        A `LearningRateSchedule`; calling it with the optimizer's step count
        returns the float32 learning rate.

    Example:

    ```python
    lr = keras_sam.schedules.Constant(0.1)  # or with warmup:
    lr = keras_sam.schedules.Constant(0.1, steps_per_epoch=390, warmup_epochs=5)
    optimizer = keras.optimizers.SGD(learning_rate=lr)
    ```
    """

    _needs_horizon = False

    def __init__(self, initial_learning_rate, epochs=None, steps_per_epoch=None, warmup_epochs=0):
        super().__init__(
            initial_learning_rate,
            initial_learning_rate,
            epochs,
            steps_per_epoch,
            warmup_epochs,
        )

    def _decay(self, p):
        return ops.full_like(p, self.initial_learning_rate)

    def get_config(self):
        config = super().get_config()
        del config["final_learning_rate"]
        return config


# --------------------------------------------------------------------------


def steps_per_epoch(num_examples, batch_schedule, epochs, drop_remainder=True):
    """Number of optimizer steps of each epoch under a batch size schedule.

    The result is what the schedules of this module take as `steps_per_epoch`
    when the (global) batch size changes during training.

    Args:
        num_examples: positive int, the number of training examples per epoch.
        batch_schedule: the global batch size of each epoch: an int (constant);
            a dict `{epoch: batch_size}` where each size holds from its epoch
            until the next key (key 0 required); or a callable
            `epoch -> batch_size`.
        epochs: positive int, the number of epochs.
        drop_remainder: bool, default True. Whether the last partial batch of
            an epoch is dropped (`num_examples // b` steps) or kept
            (`ceil(num_examples / b)` steps).

    Returns:
        A list of `epochs` positive ints.

    Example:

    ```python
    steps = keras_sam.schedules.steps_per_epoch(
        50000, {0: 16, 40: 32, 80: 64, 120: 128, 160: 256}, epochs=200
    )
    steps[::40]  # [3125, 1562, 781, 390, 195]
    lr = keras_sam.schedules.CosineAnnealing(0.1, 0.001, 200, steps)
    ```
    """
    schedule = BatchSchedule(batch_schedule, name="batch_schedule")
    return schedule.steps_per_epoch(num_examples, epochs, drop_remainder=drop_remainder)
