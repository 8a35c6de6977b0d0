"""The running `fit()` (tested on Keras 3.12 and 3.15): its epoch iterator,
whose data `BatchSizeScheduler` swaps between epochs, the progress bar, and
the compiled metrics' directions."""

import keras

from keras_sam._keras_compat import TESTED_KERAS_VERSIONS
from keras_sam._keras_compat import check_keras_version

# --------------------------------------------------------------------------
# BatchSizeScheduler: changing the training data inside one `fit()` call.
#
# `fit` builds ONE epoch iterator before its epoch loop and keeps it in a local
# variable (backend/<backend>/trainer.py, `epoch_iterator = ...EpochIterator(...)`).
# Keras stores no reference to it on the model, so the scheduler reads it from
# the frame of the running `fit` (read only: no local is rebound, nothing is
# patched) and then swaps its data between two epochs. The attributes below are
# what that swap reads or writes; `tests/integration/test_batch_size_scheduler.py` checks
# they exist on a real fit's iterator.

_BATCH_SIZE_SCHEDULER = "BatchSizeScheduler"

EPOCH_ITERATOR_ATTRIBUTES = (
    "data_adapter",  # the DataAdapter the iterator draws from
    "steps_per_epoch",  # set when fit(steps_per_epoch=...) fixes the steps
    "_num_batches",  # steps of one epoch, read once in reset()
    "_current_iterator",  # the live iterator, re-created when None
    "_steps_seen",  # steps taken from `_current_iterator`
)
"""Attributes of `keras.src.trainers.epoch_iterator.EpochIterator` relied on."""

TF_EPOCH_ITERATOR_ATTRIBUTES = (
    "_distributed_dataset",  # TF caches strategy.experimental_distribute_dataset
    "_distribute_strategy",
)
"""Extra attributes of the TensorFlow backend's `TFEpochIterator`."""


class RunningFit:
    """What a callback needs from the `fit()` call that is running."""

    def __init__(
        self, epoch_iterator, callback_list, class_weight, initial_epoch=0, validates=None
    ):
        self.epoch_iterator = epoch_iterator
        self.callback_list = callback_list
        self.class_weight = class_weight
        self.initial_epoch = initial_epoch
        self.validates = validates
        """Whether every epoch ends with a validation pass (validation data or
        split given, `validation_freq=1`)."""


def running_fit(model):
    """The epoch iterator, CallbackList, class_weight, initial_epoch and
    validation of `model.fit()`.

    Call it from a callback hook (`on_train_begin`, `on_epoch_begin`): it walks
    up the Python stack to the frame of the `fit` method running on `model` and
    reads its locals `epoch_iterator`, `callbacks`, `class_weight`,
    `initial_epoch` (the caller's: `BackupAndRestore` resumes through
    `model._initial_epoch` later), `validation_data` (set from
    `validation_split` by then) and `validation_freq`.

    Raises:
        RuntimeError: when not called from inside `model.fit()`, or when this
            Keras names those locals differently.
    """
    check_keras_version(_BATCH_SIZE_SCHEDULER)
    import sys

    from keras.src.callbacks.callback_list import CallbackList
    from keras.src.trainers.epoch_iterator import EpochIterator

    frame = sys._getframe(1)
    try:
        while frame is not None:
            if frame.f_code.co_name == "fit":
                local = frame.f_locals
                iterator = local.get("epoch_iterator")
                if local.get("self") is model and isinstance(iterator, EpochIterator):
                    callback_list = local.get("callbacks")
                    if not isinstance(callback_list, CallbackList):
                        callback_list = None
                    _check_iterator_attributes(iterator)
                    initial_epoch = local.get("initial_epoch") or 0
                    validates = (
                        local.get("validation_data") is not None
                        and local.get("validation_freq", 1) == 1
                    )
                    return RunningFit(
                        iterator,
                        callback_list,
                        local.get("class_weight"),
                        int(initial_epoch),
                        validates,
                    )
            frame = frame.f_back
    finally:
        del frame
    raise RuntimeError(
        f"{_BATCH_SIZE_SCHEDULER} works only as a callback of `model.fit()` "
        f"(it found no running fit() of model {getattr(model, 'name', model)!r} "
        f"with an `epoch_iterator`; Keras {keras.__version__})."
    )


def _check_iterator_attributes(iterator):
    names = EPOCH_ITERATOR_ATTRIBUTES
    if keras.backend.backend() == "tensorflow":
        names = names + TF_EPOCH_ITERATOR_ATTRIBUTES
    missing = [name for name in names if not hasattr(iterator, name)]
    if missing:
        raise RuntimeError(
            f"{_BATCH_SIZE_SCHEDULER} cannot change the batch size inside fit() "
            f"on Keras {keras.__version__}: its epoch iterator has no {missing} "
            f"(tested with Keras {TESTED_KERAS_VERSIONS[0]} to "
            f"{TESTED_KERAS_VERSIONS[1]}). Use a tested Keras, or call fit() "
            "once per batch size with `initial_epoch`."
        )


def epoch_iterator_fixed_steps(epoch_iterator):
    """`steps_per_epoch` given to fit (or by config.max_steps_per_epoch)."""
    check_keras_version(_BATCH_SIZE_SCHEDULER)
    return epoch_iterator.steps_per_epoch


def epoch_iterator_data_adapter(epoch_iterator):
    """The DataAdapter the epoch iterator draws batches from."""
    check_keras_version(_BATCH_SIZE_SCHEDULER)
    return epoch_iterator.data_adapter


def epoch_iterator_num_batches(epoch_iterator):
    """Steps the epoch iterator will run in its next epoch (None: unknown)."""
    check_keras_version(_BATCH_SIZE_SCHEDULER)
    return epoch_iterator._num_batches


def set_epoch_iterator_dataset(epoch_iterator, dataset, class_weight=None, process_local=False):
    """Makes `epoch_iterator` draw its next epoch from `dataset`.

    Call it between two epochs (in `on_epoch_begin`): replaces the data adapter
    (built the way `fit` builds it, with the same `class_weight`), the step
    count, TF's cached distributed dataset (re-distributed with the iterator's
    own strategy) and drops the live iterator, so that the epoch loop creates
    a fresh one over `dataset`.

    `process_local=True`: `dataset` is already this process's share under a
    multi-process `keras.distribution` (`DataSharding.process_dataset`), so
    the adapter is built without sharding it again.

    Returns:
        The number of steps of the next epoch.
    """
    check_keras_version(_BATCH_SIZE_SCHEDULER)
    from keras.src.trainers import data_adapters

    if process_local:
        adapter = data_adapters.TFDatasetAdapter(
            dataset, class_weight=class_weight, distribution=None
        )
    else:
        adapter = data_adapters.get_data_adapter(
            x=dataset, class_weight=class_weight, shuffle=False
        )
    if hasattr(epoch_iterator, "_distributed_dataset"):
        import tensorflow as tf

        tf_dataset = adapter.get_tf_dataset()
        if not isinstance(tf_dataset, tf.distribute.DistributedDataset):
            strategy = epoch_iterator._distribute_strategy
            tf_dataset = strategy.experimental_distribute_dataset(tf_dataset)
        epoch_iterator._distributed_dataset = tf_dataset
    epoch_iterator.data_adapter = adapter
    epoch_iterator._num_batches = adapter.num_batches
    epoch_iterator._current_iterator = None
    epoch_iterator._steps_seen = 0
    return epoch_iterator._num_batches


def set_progress_steps(callback_list, steps):
    """Sets `params["steps"]` for every callback, and the progress bar target.

    `fit` hands one `params` dict to every callback, so it is updated in place
    (no callback's `set_params` is called again). `ProgbarLogger` copies
    `params["steps"]` into its `target` in `set_params` and into its `Progbar`
    when the epoch begins; both copies are updated.
    """
    check_keras_version(_BATCH_SIZE_SCHEDULER)
    from keras.src.callbacks.progbar_logger import ProgbarLogger

    params = callback_list.params
    params["steps"] = steps  # fit gave every callback this same dict
    for callback in callback_list.callbacks:
        if callback.params is not params and isinstance(callback.params, dict):
            callback.params["steps"] = steps
        if isinstance(callback, ProgbarLogger):
            callback.target = steps
            if callback.progbar is not None:
                callback.progbar.target = steps


def compiled_metric_directions(model, element_spec=None):
    """`{name: True if higher is better}` of `model`'s compiled metrics that
    state a direction (Keras' private `_direction`, which its callbacks'
    "auto" mode reads the same way; `keras.src.callbacks.MonitorCallback`).

    Keras builds the compiled metrics with the first batch, after
    `on_train_begin` on TensorFlow without a strategy; given the training
    data's `element_spec`, they are built from it first, as `fit` does on
    JAX and PyTorch (`Trainer._symbolic_build`)."""
    from keras.src.trainers import compile_utils

    compiled = getattr(model, "_compile_metrics", None)
    if compiled is not None and not compiled.built and element_spec is not None:
        model._symbolic_build(data_batch=element_spec)
    directions = {}
    for metric in model.metrics:
        if isinstance(metric, (compile_utils.CompileMetrics, compile_utils.MetricsList)):
            for m in metric.metrics:
                if hasattr(m, "_direction"):
                    directions[m.name] = m._direction == "up"
    return directions


# --------------------------------------------------------------------------
# A custom `train_step`: the loss Keras' own step computes, and the tracker
# behind the logged "loss" (both `Trainer` members, Keras 3.12 to 3.15).


def compute_loss(model, x, y, y_pred, sample_weight):
    """The training loss Keras' own `train_step` computes (`Trainer._compute_loss`,
    the wrapper that calls a user's `compute_loss` override with or without
    its `training` argument)."""
    return model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)


def loss_tracker(model):
    """The `Mean` behind the logged `"loss"` (`Trainer._loss_tracker`)."""
    return model._loss_tracker
