"""`BatchSizeScheduler`: increase (or change) the batch size inside one `fit()`.

Keras has no public way to change the batch size of a running `fit()` (asked
for since 2017: keras-team/keras #8432, #10143, #12314, #13038). This callback
rebuilds the user's `tf.data` pipeline at the epochs where the scheduled batch
size changes and hands it to the epoch loop of the running `fit()`, so that
`History`, `EarlyStopping`, `ModelCheckpoint`, `BackupAndRestore`, `CSVLogger`
and `TensorBoard` see one ordinary training run. The few private Keras
attributes this needs are read and written in `keras_sam._keras_compat.fit_loop` only,
behind a Keras version check.

Public mechanisms against private ones, compared before choosing:

- steps per epoch, `optimizer.iterations`, `History`: the public alternative
  is one `fit` per batch size with `initial_epoch` on the same model. It
  counts steps and iterations exactly too, but every callback restarts with
  each `fit` (`EarlyStopping`'s patience and best value, `ReduceLROnPlateau`'s
  wait, `History` split into one object per phase, `BackupAndRestore`
  resumes only within a phase), and its first step at a new batch size
  retraces the train function. `python benchmarks/batch_switch.py` measures
  both in one process ("one fit per batch size" against "switch"; results in
  `benchmarks/results/batch_switch.md`): the in-fit switch costs a fraction
  of a step and no trace, the second `fit` one trace and many steps' time.
  So the epoch loop's data is swapped privately, and nothing else is.
- progress bar: `params["steps"]` is the public dict every callback reads;
  only `ProgbarLogger`'s own copies of it (`target`, its `Progbar`) are
  private.
- `optimizer.iterations` and `BackupAndRestore` are used as they are (public).
"""

import keras

from keras_sam import _validation
from keras_sam._keras_compat import fit_loop
from keras_sam._keras_compat import optimizers as optimizer_internals
from keras_sam.batch_schedule import BatchSchedule
from keras_sam.callbacks import _datasets
from keras_sam.callbacks._growing_batch import GrowingBatchSize
from keras_sam.schedules import _EpochSchedule

_FEATURE = "BatchSizeScheduler"
_SCHEDULE = (
    "a dict {epoch: batch_size} of int epochs >= 0 (key 0 required) to int "
    "batch sizes >= 1, a callable epoch -> batch_size, an AdaptiveBatchSize or a "
    "BatchSizeOnPlateau"
)


def doubling_schedule(initial=16, stages=5, epochs_per_stage=40):
    """The paper's increasing-batch schedule: the batch size doubles per stage.

    Args:
        initial: batch size of the first stage, a positive int.
        stages: number of stages, a positive int.
        epochs_per_stage: epochs of each stage, a positive int.

    Returns:
        A dict `{epoch: batch_size}` for `BatchSizeScheduler`; the last stage
        lasts until the end of training.

    Example:

    >>> doubling_schedule()
    {0: 16, 40: 32, 80: 64, 120: 128, 160: 256}
    """
    initial = _validation.integer("initial", initial, low=1)
    stages = _validation.integer("stages", stages, low=1)
    epochs_per_stage = _validation.integer("epochs_per_stage", epochs_per_stage, low=1)
    return {stage * epochs_per_stage: initial * 2**stage for stage in range(stages)}


class BatchSizeScheduler(keras.callbacks.Callback):
    """Changes the global batch size between epochs of one `fit()` call.

    At each epoch whose batch size differs from the last, `fit` draws the
    epoch from `dataset_fn(batch_size)` (built once per size): every epoch
    runs exactly its dataset's number of batches, `optimizer.iterations` and
    the progress bar count them, and `logs["batch_size"]` records the size.
    By default the batch dimension is hidden from the train function, so
    TensorFlow traces it once for every batch size (`relax_batch_shape`;
    a model with a fixed `sub_batch_size` keeps static shapes).

    Pass `dataset_fn(batch size of epoch 0)` to `fit` (or of epoch `k` with
    `initial_epoch=k`), no `steps_per_epoch`, and put the scheduler FIRST in
    `callbacks`. The batch size is global: replicas (`MirroredStrategy`) and
    processes (multi-process `keras.distribution`, batched with
    `drop_remainder=True`) each get an equal share. `BackupAndRestore`
    resumes at the resumed epoch's batch size. Every check (the datasets, the
    replicas, the model's sub-batches, the data passed to `fit`) runs before
    the first step. The running `fit`'s data is swapped through Keras
    internals (`keras_sam._keras_compat.fit_loop`); an untested Keras is
    refused or warned about in `on_train_begin`. The batch-size guide says
    more (docs/batch-ramp.md).

    Args:
        schedule: the global batch size per epoch: a dict `{epoch:
            batch_size}` with key 0 (see `doubling_schedule`), a callable
            `epoch -> batch_size`, or a policy deciding as training goes
            (`AdaptiveBatchSize`, `BatchSizeOnPlateau`; the logs then also
            get `next_batch_size`).
        dataset_fn: `batch_size -> tf.data.Dataset`, the user's BATCHED
            pipeline with a known, finite cardinality (no `repeat()`, no
            `filter()` without `assert_cardinality`).
        relax_batch_shape: None (True unless the model has a
            `sub_batch_size`), True or False.

    Raises:
        ValueError: for an invalid `schedule`, `dataset_fn` or dataset, a
            batch size the replicas, devices or sub-batches do not divide,
            or `fit` data not batched as scheduled; before any step.

    Example:

    ```python
    scheduler = BatchSizeScheduler(doubling_schedule(16, 5, 40), dataset_fn)
    lr = keras_sam.schedules.CosineAnnealing(
        0.1, 0.001, epochs=200, steps_per_epoch=scheduler.steps_per_epoch(200)
    )
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=...)
    history = model.fit(dataset_fn(16), epochs=200, callbacks=[scheduler])
    history.history["batch_size"]  # [16] * 40 + [32] * 40 + ... + [256] * 40
    ```
    """

    def __init__(self, schedule, dataset_fn, relax_batch_shape=None):
        super().__init__()
        self.relax_batch_shape = _validation.one_of(
            "relax_batch_shape", relax_batch_shape, (None, True, False)
        )
        if not (isinstance(schedule, dict) or callable(schedule)):
            raise _validation.error("schedule", _SCHEDULE, schedule)
        self._batch_schedule = BatchSchedule(schedule, name="schedule")
        if not callable(dataset_fn):
            raise _validation.error(
                "dataset_fn",
                "a callable batch_size -> batched tf.data.Dataset",
                dataset_fn,
            )
        self.schedule = schedule
        self._adaptive = schedule if isinstance(schedule, GrowingBatchSize) else None
        self._backup_dir = None  # BackupAndRestore's folder (adaptive decisions)
        self._first_epoch = True  # the first epoch of the running fit() is next
        self.dataset_fn = dataset_fn
        self._cache = _datasets.DatasetCache(dataset_fn)
        self._fit = None  # fit_loop.RunningFit of the running fit()
        self._current = None  # batch size the epoch iterator draws now
        self._sharding = None  # distribution_internals.DataSharding (keras.distribution)

    # ---------------------------------------------------------------- public
    def batch_size_at(self, epoch):
        """The global batch size scheduled for `epoch` (0-based).

        Raises:
            ValueError: when a callable `schedule` returns something that is
                not a positive int.
        """
        return self._batch_schedule.at(epoch)

    def steps_per_epoch(self, epochs):
        """The number of steps of each of the first `epochs` epochs.

        Each count is the cardinality of `dataset_fn(batch_size)` at the
        epoch's batch size (datasets are built once per batch size and reused
        by training), e.g. for
        `keras_sam.schedules.CosineAnnealing(..., steps_per_epoch=...)`.

        Args:
            epochs: number of epochs, a positive int.

        Returns:
            A list of `epochs` ints.
        """
        epochs = _validation.integer("epochs", epochs, low=1)
        return [self._cache.steps(self.batch_size_at(e)) for e in range(epochs)]

    def get_config(self):
        """The schedule (None when it is a callable; a policy's name and
        config) and `relax_batch_shape`."""
        schedule = self._batch_schedule.as_dict()
        if self._adaptive is not None:
            schedule = {"adaptive": self._adaptive.get_config()}
            if type(self._adaptive).__name__ != "AdaptiveBatchSize":
                schedule = {type(self._adaptive).__name__: self._adaptive.get_config()}
        return {"schedule": schedule, "relax_batch_shape": self.relax_batch_shape}

    # ------------------------------------------------------------- callbacks
    def on_train_begin(self, logs=None):
        fit = fit_loop.running_fit(self.model)
        iterator = fit.epoch_iterator
        fixed = fit_loop.epoch_iterator_fixed_steps(iterator)
        if fixed:
            raise ValueError(
                f"{_FEATURE} sets each epoch's steps from the dataset's "
                f"cardinality; do not pass `steps_per_epoch` ({fixed}) to "
                "`fit()` (nor set keras.config.max_steps_per_epoch)."
            )
        self._sharding = _datasets.check_distribution(self.relax_batch_shape)
        epochs = self.params.get("epochs") if self.params else None
        epochs = _validation.as_int(epochs)
        if epochs is None or epochs <= 0:
            epochs = 1
        sizes = {}
        if self._adaptive is not None:
            self._check_adaptive(fit, epochs)
            for batch_size in self._adaptive.reachable_batch_sizes():
                sizes[batch_size] = f"reachable by the {type(self._adaptive).__name__}"
        for epoch in range(epochs):
            sizes.setdefault(self.batch_size_at(epoch), f"epoch {epoch}")
        replicas = self._num_replicas()
        for batch_size, where in sizes.items():
            _datasets.check_batch_size(batch_size, where, replicas, self._sharding, self.model)
        for batch_size in sizes:
            self._cache.steps(batch_size)  # builds and checks the dataset
            if self._per_process():
                _datasets.check_full_batches(self._cache.dataset(batch_size), batch_size)
        allowed = [self.batch_size_at(0)]
        if fit.initial_epoch and self.batch_size_at(fit.initial_epoch) not in allowed:
            allowed.append(self.batch_size_at(fit.initial_epoch))
        given = self._cache.batch_size_of_fit_data(
            fit_loop.epoch_iterator_data_adapter(iterator),
            fit_loop.epoch_iterator_num_batches(iterator),
            allowed,
            fit.initial_epoch,
            self._sharding if self._per_process() else None,
        )
        self._fit = fit
        # With relaxed shapes even the first epoch draws from our dataset, so
        # the train function is traced once, for every batch size. Across
        # processes too: fit's own process slice has no step count.
        swap_first = self._relaxed() or self._per_process()
        self._current = None if swap_first else given
        self._first_epoch = True

    def on_epoch_begin(self, epoch, logs=None):
        if self._fit is None:
            raise RuntimeError(
                f"{_FEATURE}.on_epoch_begin ran without on_train_begin: use "
                "it as a callback of `model.fit()`."
            )
        if self._adaptive is not None and self._first_epoch:
            # A resumed run (BackupAndRestore) starts here: the decisions
            # for the epochs after this one are made again.
            self._adaptive.forget_after(epoch)
        self._first_epoch = False
        batch_size = self.batch_size_at(epoch)
        if batch_size == self._current:
            return
        dataset = self._cache.drawn(batch_size, self._relaxed(), self._sharding)
        steps = fit_loop.set_epoch_iterator_dataset(
            self._fit.epoch_iterator,
            dataset,
            self._fit.class_weight,
            process_local=self._per_process(),
        )
        self._current = batch_size
        if self._fit.callback_list is not None:
            fit_loop.set_progress_steps(self._fit.callback_list, steps)
        elif self.params is not None:
            self.params["steps"] = steps
        if self._adaptive is not None:
            self._update_learning_rate_steps()

    def on_epoch_end(self, epoch, logs=None):
        current = self._current if self._current is not None else self.batch_size_at(epoch)
        if logs is not None:
            logs["batch_size"] = current
        if self._adaptive is None:
            return
        decided = self._adaptive.decide_from_logs(epoch, dict(logs or {}))
        if logs is not None:
            logs["next_batch_size"] = decided
        if self._backup_dir is not None:
            self._adaptive.save(self._backup_dir)

    def on_train_end(self, logs=None):
        self._fit = None  # let the epoch iterator and its datasets go

    # ------------------------------------------------------ adaptive batch
    def _check_adaptive(self, fit, epochs):
        """The model logs the noise scale; the decisions saved by a
        BackupAndRestore are read; epoch-axis learning-rate schedules were
        built from `steps_per_epoch(epochs)`."""
        spec = self._cache.dataset(self._adaptive.initial_batch_size).element_spec
        self._adaptive.check_model(self.model, spec, fit.validates)
        callbacks = list(getattr(fit.callback_list, "callbacks", None) or [])
        backups = [c for c in callbacks if isinstance(c, keras.callbacks.BackupAndRestore)]
        self._backup_dir = backups[0].backup_dir if backups else None
        if backups and self in callbacks and callbacks.index(backups[0]) < callbacks.index(self):
            raise ValueError(
                f"Put the {_FEATURE} before the BackupAndRestore in `callbacks`: the "
                f"{type(self._adaptive).__name__}'s decision at an epoch's end must be saved "
                "before the weights are, or a run resumed between the two would use the old "
                "batch size."
            )
        if self._backup_dir is not None:
            self._adaptive.restore(self._backup_dir)
        for schedule in self._epoch_schedules():
            initial = self._cache.steps(self._adaptive.initial_batch_size)
            steps = schedule.epoch_steps
            horizon = max(epochs, len(steps))
            allowed = ([initial] * horizon, self.steps_per_epoch(horizon))
            if steps not in [a[: len(steps)] for a in allowed]:
                raise ValueError(
                    f"The learning-rate schedule {type(schedule).__name__} was built with "
                    f"`steps_per_epoch`={schedule.steps_per_epoch}, not with the steps of "
                    f"this scheduler. Build it with "
                    f"`steps_per_epoch=scheduler.steps_per_epoch({epochs})`: the scheduler "
                    "then updates it whenever the batch grows."
                )

    def _epoch_schedules(self):
        """The epoch-axis learning-rate schedules (`keras_sam.schedules`, built
        with `steps_per_epoch`) of the optimizers that apply updates: one, or
        each of a MultiOptimizer's."""
        return [
            s
            for s in optimizer_internals.learning_rate_schedules(self.model.optimizer)
            if isinstance(s, _EpochSchedule) and s.epoch_steps is not None
        ]

    def _update_learning_rate_steps(self):
        """Gives the epoch-axis learning-rate schedules the steps of the epochs
        decided so far (retracing the train function once if they changed)."""
        epochs = _validation.as_int((self.params or {}).get("epochs")) or 1
        steps = self.steps_per_epoch(max(epochs, 1))
        changed = [schedule.set_epoch_steps(steps) for schedule in self._epoch_schedules()]
        if any(changed):
            self.model.make_train_function(force=True)

    # --------------------------------------------------------------- helpers
    def _num_replicas(self):
        strategy = getattr(self.model, "distribute_strategy", None)
        return int(getattr(strategy, "num_replicas_in_sync", 1) or 1)

    def _per_process(self):
        """Whether fit gives each process a slice of every global batch
        (multi-process `keras.distribution`, JAX)."""
        return self._sharding is not None and self._sharding.per_process

    def _relaxed(self):
        """Whether epochs draw the pipelines with their batch dimension hidden."""
        if self._per_process():
            return False  # the processes' split needs the static batch size
        if self.relax_batch_shape is not None:
            return self.relax_batch_shape
        # A fixed sub-batch size needs the batch size at trace time.
        return not getattr(self.model, "sub_batch_size", None)
