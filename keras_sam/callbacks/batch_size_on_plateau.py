"""`BatchSizeOnPlateau`: the batch-size twin of `ReduceLROnPlateau`.

Doubling the batch halves the noise temperature `lr / B` of SGD as halving
the rate does (Smith, Kindermans, Ying & Le 2018), and such a decay helps
most when progress at the current temperature has stalled, which is when
Keras users reach for `ReduceLROnPlateau`. This policy grows the batch then,
with `ReduceLROnPlateau`'s exact waiting and cooldown rules and its
"auto" / "min" / "max" modes (`keras_sam.callbacks._monitor.MonitorRule`):
at an epoch's end, with `current` the monitored value,

    in cooldown:                 cooldown -= 1; wait = 0
    current improves on best:    best = current; wait = 0
    elif not in cooldown:        wait += 1
                                 if wait >= patience and batch < max_batch_size
                                 (and, when guarded, noise_scale >=
                                 noise_scale_threshold * batch):
                                     batch = min(factor * batch, max_batch_size)
                                     cooldown = cooldown epochs; wait = 0
"""

from keras_sam import _validation
from keras_sam.callbacks._growing_batch import GrowingBatchSize
from keras_sam.callbacks._monitor import MonitorRule


class BatchSizeOnPlateau(GrowingBatchSize, MonitorRule):
    """A schedule for `BatchSizeScheduler` that grows the batch when a
    metric has stopped improving.

    Pass it as `BatchSizeScheduler`'s `schedule`. At every epoch's end it
    applies `ReduceLROnPlateau`'s rule (see the module docstring) to
    `monitor`, any key of the epoch's logs (`"loss"`, `"val_loss"`,
    `"val_accuracy"`, a metric), and multiplies the batch size by `factor`
    (never above `max_batch_size`) where `ReduceLROnPlateau` would multiply
    the rate by its factor. With `noise_scale_threshold` set, the batch
    grows only while the model's logged `noise_scale` is at least
    `noise_scale_threshold * batch_size`, so that a larger batch still pays
    for itself (the model must log it: `SAMModel(..., noise_scale=True)`);
    a stall with a lower noise scale keeps the batch and waits on.

    History gets `batch_size` and `next_batch_size` per epoch. The decisions
    and the rule's counters (best value, epochs waited, cooldown) are the
    schedule's state: with a `keras.callbacks.BackupAndRestore` after the
    scheduler in `fit`'s callbacks they are saved at every epoch's end and
    read back when training resumes, so a resumed run takes the batch sizes
    of an uninterrupted one. Epoch-axis learning-rate schedules
    (`keras_sam.schedules`) built with
    `steps_per_epoch=scheduler.steps_per_epoch(epochs)` follow the steps of
    the batch sizes taken, as with `AdaptiveBatchSize`.

    Args:
        initial_batch_size: the global batch size of epoch 0, an int >= 1.
        factor: the growth factor, an int >= 2.
        monitor: the logs key to watch. A `val_*` key needs validation data
            in `fit` (`validation_data` or `validation_split`, every epoch),
            checked before the first step.
        patience: epochs without improvement before the batch grows, an
            int >= 0 (`ReduceLROnPlateau`'s default: 10).
        min_delta: an improvement is a decrease by more than this, >= 0.
        cooldown: epochs after a change in which waiting does not count, an
            int >= 0.
        max_batch_size: the largest global batch size, an int >=
            `initial_batch_size`.
        noise_scale_threshold: None (default: no guard) or a float > 0.
        mode: `"auto"` (default), `"min"` or `"max"`, as in
            `ReduceLROnPlateau`: whether the monitored value should fall
            (`loss`) or rise (`val_accuracy`, `val_auc`). `"auto"` decides
            from the name and the compiled metric's direction, as Keras'
            callbacks do, before the first step; a metric of your own needs
            an explicit mode.

    Example:

    ```python
    policy = keras_sam.callbacks.BatchSizeOnPlateau(
        32, monitor="val_loss", patience=3, max_batch_size=512
    )
    scheduler = keras_sam.callbacks.BatchSizeScheduler(policy, dataset_fn)
    history = model.fit(
        dataset_fn(32), validation_data=val, epochs=100, callbacks=[scheduler]
    )
    history.history["batch_size"]
    ```
    """

    def __init__(
        self,
        initial_batch_size,
        factor=2,
        monitor="loss",
        patience=10,
        min_delta=1e-4,
        cooldown=0,
        max_batch_size=None,
        noise_scale_threshold=None,
        mode="auto",
    ):
        if max_batch_size is None:
            raise _validation.error(
                "max_batch_size", "an int >= initial_batch_size", max_batch_size
            )
        GrowingBatchSize.__init__(self, initial_batch_size, max_batch_size, factor)
        MonitorRule.__init__(self, monitor, mode, min_delta)
        self.patience = _validation.integer("patience", patience, low=0)
        self.cooldown = _validation.integer("cooldown", cooldown, low=0)
        self.noise_scale_threshold = None
        if noise_scale_threshold is not None:
            self.noise_scale_threshold = _validation.real(
                "noise_scale_threshold", noise_scale_threshold, low=0, low_inclusive=False
            )
        self._set_state(None)

    @property
    def required_logs(self):
        guard = ("noise_scale",) if self.noise_scale_threshold is not None else ()
        return (self.monitor,) + guard

    def check_model(self, model, element_spec=None, validates=None):
        if self.watches_validation and validates is False:
            raise ValueError(
                f"BatchSizeOnPlateau monitors {self.monitor!r}, a value of the validation "
                "data, but this `fit` validates not at every epoch's end. Pass "
                "`validation_data=` (or `validation_split=`) to `fit` with "
                "`validation_freq=1`, or monitor 'loss'."
            )
        self.resolve_direction(model, element_spec)
        if (
            self.noise_scale_threshold is not None
            and getattr(model, "noise_scale", False) is not True
        ):
            raise ValueError(
                "BatchSizeOnPlateau with a `noise_scale_threshold` reads the gradient "
                f"noise scale, which {type(model).__name__} does not measure. Wrap the "
                "model in `keras_sam.SAMModel(model, ..., noise_scale=True)`, or pass "
                "`noise_scale_threshold=None`."
            )

    def _grows(self, epoch, batch_size, logs):
        current = float(logs[self.monitor])
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self.is_improvement(current, self.best):
            self.best = current
            self.wait = 0
            return False
        if self.cooldown_counter > 0:
            return False
        self.wait += 1
        if self.wait < self.patience or batch_size >= self.max_batch_size:
            return False
        if self.noise_scale_threshold is not None:
            noise = float(logs["noise_scale"])
            if not noise >= self.noise_scale_threshold * batch_size:  # NaN: no
                return False
        self.cooldown_counter = self.cooldown
        self.wait = 0
        return True

    def _state(self):
        return {"best": self.best, "wait": self.wait, "cooldown_counter": self.cooldown_counter}

    def _set_state(self, state):
        state = state or {"best": None, "wait": 0, "cooldown_counter": 0}
        self.best = None if state["best"] is None else float(state["best"])
        self.wait = int(state["wait"])
        self.cooldown_counter = int(state["cooldown_counter"])

    def get_config(self):
        return dict(
            GrowingBatchSize.get_config(self),
            **MonitorRule.get_config(self),
            patience=self.patience,
            cooldown=self.cooldown,
            noise_scale_threshold=self.noise_scale_threshold,
        )
