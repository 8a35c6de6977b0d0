"""`AdaptiveBatchSize`: a batch size that grows when the measured gradient
noise scale says so, as a schedule for `BatchSizeScheduler`.

The rule (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of
Large-Batch Training"): while the batch `b` is well below the simple noise
scale `B_simple = tr(Sigma) / |G|^2`, a larger batch cuts the steps needed
almost in proportion, so the examples it costs are not wasted; Smith,
Kindermans, Ying and Le (2018) give the reason a growing batch acts like a
decaying learning rate. At the end of every epoch, with `b` that epoch's
batch size and `B_noise` the model's logged `noise_scale`,

    next = min(factor * b, max_batch_size)    if B_noise >= threshold * b,
                                              b < max_batch_size and at least
                                              `min_epochs` epochs have passed
                                              since the last change
    next = b                                  otherwise.
"""

from keras_sam import _validation
from keras_sam.callbacks._growing_batch import GrowingBatchSize


def next_batch_size(batch_size, noise_scale, epochs_since_change, config):
    """The rule above: the batch size of the next epoch.

    Args:
        batch_size: the epoch's batch size.
        noise_scale: the measured `B_simple` at the epoch's end (inf grows).
        epochs_since_change: epochs run at `batch_size` so far (>= 1).
        config: an `AdaptiveBatchSize` (its factor, threshold, limits).

    Returns:
        An int.
    """
    grow = (
        noise_scale >= config.threshold * batch_size
        and batch_size < config.max_batch_size
        and epochs_since_change >= config.min_epochs
    )
    return min(batch_size * config.factor, config.max_batch_size) if grow else batch_size


class AdaptiveBatchSize(GrowingBatchSize):
    """A schedule for `BatchSizeScheduler` that grows the batch from the
    measured gradient noise scale.

    Pass it as `BatchSizeScheduler`'s `schedule`, with a model that logs
    `noise_scale` (`keras_sam.SAMModel(..., noise_scale=True)`, also
    `GSAMModel` and the others of the SAM step; `rho=0` takes one gradient
    per step, as plain Keras, though on one device as the batch's two halves:
    see `SAMModel`'s `noise_scale`). An epoch whose noise scale is NaN (no
    step measured it, e.g. batches of one example) keeps its batch size.
    At each epoch's end the scheduler applies the rule of this module's
    docstring and logs `next_batch_size` beside `batch_size` and
    `noise_scale`. Every reachable batch size (`initial_batch_size *
    factor**k` below `max_batch_size`, and `max_batch_size`) is checked and
    its pipeline built before the first step. The decisions so far are the
    schedule's state (`history`): with a `keras.callbacks.BackupAndRestore`
    among `fit`'s callbacks (after the scheduler) they are saved in its
    `backup_dir` at every epoch's end and read back when training resumes, so a resumed run takes
    the batch sizes (and, with the model's own state, the weights) of an
    uninterrupted one.

    Epoch-axis learning-rate schedules (`keras_sam.schedules`) keep their
    meaning: build them with `steps_per_epoch=scheduler.steps_per_epoch(epochs)`
    (the steps if the batch never grew); after each change the scheduler
    gives the schedule the steps of the epochs run and of the new batch size,
    and retraces the train function once.

    Args:
        initial_batch_size: the global batch size of epoch 0, an int >= 1.
        max_batch_size: the largest global batch size, an int >=
            `initial_batch_size`.
        factor: the growth factor, an int >= 2.
        threshold: grow when `noise_scale >= threshold * batch_size`, a
            float > 0 (1: grow once the batch reaches the noise scale).
        min_epochs: epochs between two changes at least, an int >= 1.

    Example:

    ```python
    policy = keras_sam.callbacks.AdaptiveBatchSize(16, max_batch_size=256)
    scheduler = keras_sam.callbacks.BatchSizeScheduler(policy, dataset_fn)
    model = keras_sam.SAMModel(inner, rho=0.05, noise_scale=True)
    model.compile(optimizer="sgd", loss=...)
    history = model.fit(dataset_fn(16), epochs=100, callbacks=[scheduler])
    history.history["batch_size"], history.history["noise_scale"]
    ```
    """

    def __init__(self, initial_batch_size, max_batch_size, factor=2, threshold=1.0, min_epochs=1):
        super().__init__(initial_batch_size, max_batch_size, factor)
        self.threshold = _validation.real("threshold", threshold, low=0, low_inclusive=False)
        self.min_epochs = _validation.integer("min_epochs", min_epochs, low=1)

    required_logs = ("noise_scale",)

    def check_model(self, model, element_spec=None, validates=None):
        if getattr(model, "noise_scale", False) is not True:
            raise ValueError(
                "BatchSizeScheduler with an AdaptiveBatchSize decides from the gradient "
                f"noise scale, which {type(model).__name__} does not measure. "
                "Wrap the model in `keras_sam.SAMModel(model, ..., noise_scale=True)` "
                "(`rho=0` for plain SGD: one gradient per step), or GSAMModel / LookSAMModel / "
                "AESAMModel with `noise_scale=True`."
            )

    def _grows(self, epoch, batch_size, logs):
        last_change = max(start for start in self.history if start <= epoch)
        size = next_batch_size(
            batch_size, float(logs["noise_scale"]), epoch + 1 - last_change, self
        )
        return size != batch_size

    def decide(self, epoch, noise_scale):
        """Applies the rule at the end of `epoch`; records and returns the
        batch size of epoch `epoch + 1`."""
        return self.decide_from_logs(epoch, {"noise_scale": noise_scale})

    def get_config(self):
        return dict(super().get_config(), threshold=self.threshold, min_epochs=self.min_epochs)
