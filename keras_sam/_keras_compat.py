"""Private Keras internals used by keras_sam, except the `Trainer` members that
`keras_sam.models` uses (listed below).

This module holds the accesses to private Keras attributes and modules
(`keras.src`) that keras_sam needs beyond subclassing `keras.Model`: the
optimizer's `_learning_rate`, and the running `fit()`'s epoch iterator,
`CallbackList` and progress bar for `BatchSizeScheduler`. Each access is named
after what it reads, so a Keras release that moves an attribute breaks here,
in one place, with a message that says so.

`MSAMModel` reads the optimizer's momentum buffers (`first_moments`).

It is not the only such code: `keras_sam.models` (the SAM `train_step`, a
`keras.Model` subclass) also relies on private members of Keras' `Trainer`,
inherited from `keras.Model`:

- `self._compute_loss(x=..., y=..., y_pred=..., sample_weight=...,
  training=...)`, the wrapper around the public `compute_loss` that Keras'
  own `train_step` calls (it drops `training` for overrides of `compute_loss`
  that lack it);
- `self._loss_tracker`, the `Mean` metric behind the logged `"loss"`, updated
  with the clean pass's loss.
"""

import warnings

import keras

TESTED_KERAS_VERSIONS = ((3, 12), (3, 15))
"""Inclusive range of Keras minor versions the test suite runs on (CI runs the
whole suite on the oldest and on the newest)."""

_warned = set()


def keras_version():
    return tuple(int(p) for p in keras.__version__.split(".")[:2])


def check_keras_version(feature):
    """Checks that `feature` may use Keras internals on this Keras.

    Older than the tested range: a clear error. Newer: a warning (once), and
    the feature goes on; the attributes it needs are checked where they are
    read (`running_fit`), so a Keras that moved them fails with a message
    naming them, before training starts.
    """
    low, high = TESTED_KERAS_VERSIONS
    version = keras_version()
    tested = f"{low[0]}.{low[1]} to {high[0]}.{high[1]}"
    if version < low:
        raise RuntimeError(
            f"{feature} relies on Keras internals tested with Keras {tested}; "
            f"this is Keras {keras.__version__}. Install a tested version "
            f"(pip install 'keras>={low[0]}.{low[1]}')."
        )
    if version > high and feature not in _warned:
        _warned.add(feature)
        warnings.warn(
            f"{feature} relies on Keras internals tested with Keras {tested}; "
            f"this is Keras {keras.__version__}, newer. It checks what it needs "
            "before training and says so if something moved.",
            stacklevel=3,
        )


def rate_optimizer(optimizer):
    """The optimizer whose learning rate stands for `optimizer`'s (GSAM's
    radius follows it): a LossScaleOptimizer's inner optimizer, and a
    `keras.optimizers.MultiOptimizer`'s (Keras 3.15+) default optimizer,
    the one of every variable its `OptimizerMap` does not map elsewhere.

    Raises:
        ValueError: for a MultiOptimizer built from a callable (it has no
            default optimizer).
    """
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if not is_multi_optimizer(optimizer):
        return optimizer
    default = getattr(optimizer._optimizer_map, "default_optimizer", None)
    if default is None:
        raise ValueError(
            "This MultiOptimizer was built from a callable, so it has no default "
            "optimizer whose learning rate keras_sam could follow. Build it from "
            "`keras.optimizers.OptimizerMap(default_optimizer, {pattern: optimizer})`: "
            "keras_sam reads the default optimizer's rate."
        )
    return default


def is_multi_optimizer(optimizer):
    """Whether `optimizer` is a `keras.optimizers.MultiOptimizer` (Keras 3.15+)."""
    multi = getattr(keras.optimizers, "MultiOptimizer", None)
    return multi is not None and isinstance(optimizer, multi)


def sub_optimizers(optimizer):
    """The optimizers that apply updates: a MultiOptimizer's (public
    `optimizers`), or the optimizer itself (a LossScaleOptimizer's inner one)."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if is_multi_optimizer(optimizer):
        return list(optimizer.optimizers)
    return [optimizer]


def learning_rate_schedule(optimizer):
    """The learning rate as given to `rate_optimizer(optimizer)`: a float,
    variable or schedule."""
    return rate_optimizer(optimizer)._learning_rate


MOMENTUM_OPTIMIZERS = ("SGD(momentum > 0)", "Adam", "AdamW", "Adamax", "Nadam")
"""Optimizers whose first-moment buffer `MSAMModel` can perturb along."""


def first_moment_sign(optimizer):
    """`(inner optimizer, sign)`: `sign * buffer` points along the gradient.

    Keras' SGD keeps `m = momentum * m - lr * g` (a descent direction, sign
    -1); Adam, AdamW, Adamax and Nadam keep `m = beta_1 * m + (1 - beta_1) g`
    (sign +1). A LossScaleOptimizer is looked through.

    Raises:
        ValueError: for SGD with `momentum=0` (it keeps no buffer) or an
            optimizer not in `MOMENTUM_OPTIMIZERS`.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    optimizers = keras.optimizers
    if isinstance(inner, optimizers.SGD):
        if not inner.momentum:
            raise ValueError(
                "MSAMModel perturbs along the optimizer's momentum, and "
                f"SGD(momentum={inner.momentum}) keeps none: pass an SGD with "
                "`momentum` > 0 (e.g. keras.optimizers.SGD(0.1, momentum=0.9)) "
                "or Adam / AdamW."
            )
        return inner, -1.0
    if isinstance(inner, (optimizers.Adam, optimizers.Adamax, optimizers.Nadam)):
        return inner, 1.0  # AdamW is an Adam
    raise ValueError(
        f"MSAMModel perturbs along the optimizer's first moment; "
        f"{type(inner).__name__} is not supported. Use one of "
        f"{', '.join(MOMENTUM_OPTIMIZERS)}."
    )


def first_moments(optimizer, variables):
    """`(buffers, sign)`: the optimizer's momentum buffer of each variable
    and the sign of `first_moment_sign`. Reads the private
    `_get_variable_index` and Adam's `_momentums`; the optimizer must be
    built (it is, inside `fit`)."""
    inner, sign = first_moment_sign(optimizer)
    buffers = inner.momentums if sign < 0 else inner._momentums
    return [buffers[inner._get_variable_index(v)] for v in variables], sign


# --------------------------------------------------------------------------
# BatchSizeScheduler: changing the training data inside one `fit()` call.
#
# `fit` builds ONE epoch iterator before its epoch loop and keeps it in a local
# variable (backend/<backend>/trainer.py, `epoch_iterator = ...EpochIterator(...)`).
# Keras stores no reference to it on the model, so the scheduler reads it from
# the frame of the running `fit` (read only: no local is rebound, nothing is
# patched) and then swaps its data between two epochs. The attributes below are
# what that swap reads or writes; `tests/test_batch_size_scheduler.py` checks
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


# --------------------------------------------------------------------------
# keras.distribution (JAX backend): how `fit` splits a global tf.data batch
# between processes.
#
# Under a multi-process distribution with `auto_shard_dataset` on (the
# default), `fit`'s TFDatasetAdapter calls `distribution.distribute_dataset`
# (trainers/data_adapters/__init__.py, tf_dataset_adapter.py). That
# (distribution/distribution_lib.py, `distribute_tf_dataset`) reads the
# GLOBAL batch size G from the pipeline's `batch` op (tf.data
# `compute_batch_size`; a batch dimension hidden by a `map` reads as unknown,
# an error) and, with R model replicas (devices along the batch axis) and P
# processes:
#   R == 1:  every process draws the whole batch;
#   R >= P:  `rebatch(G // P).shard(P, process_id)`: process i draws the i-th
#            of P consecutive slices of every global batch (DataParallel);
#   R <  P:  `rebatch(G // R).shard(R, data_shard_id)` (model parallel).
# The JAX epoch iterator then builds each step's global array from the
# processes' slices (`jax.make_array_from_process_local_data`), so the train
# step sees the global batch. `rebatch` makes the cardinality UNKNOWN (the
# epoch then has no step count and ends by running out of data), and a
# partial last batch gives the processes different step counts.


class DataSharding:
    """What the active `keras.distribution` does to `fit`'s tf.data batches."""

    def __init__(self, distribution):
        self.distribution = distribution
        # Keras >= 3.13: the public `num_processes`; 3.12: `_num_process`.
        processes = getattr(distribution, "num_processes", None)
        if processes is None:
            processes = getattr(distribution, "_num_process", 1)
        self.num_processes = int(processes or 1)
        self.multi_process = bool(
            getattr(distribution, "_is_multi_process", self.num_processes > 1)
        )
        self.auto_shard = bool(getattr(distribution, "auto_shard_dataset", False))
        try:  # Keras >= 3.13
            self.num_replicas = int(distribution.num_model_replicas)
        except (AttributeError, NotImplementedError, ValueError):
            # Keras 3.12: a DataParallel replica per device of its mesh.
            if isinstance(distribution, keras.distribution.DataParallel):
                self.num_replicas = int(distribution.device_mesh.devices.size)
            else:
                self.num_replicas = 1

    @property
    def per_process(self):
        """Whether `fit` gives each process a slice of every global batch."""
        return self.multi_process and self.auto_shard

    def process_dataset(self, dataset, steps):
        """This process's share of the global batched `dataset`.

        The same transformation `fit` applies
        (`distribution.distribute_dataset`), with the cardinality `steps` (the
        global dataset's) stated again: every global batch is full, so every
        process draws exactly one slice of each.
        """
        import tensorflow as tf

        local = self.distribution.distribute_dataset(dataset)
        return local.apply(tf.data.experimental.assert_cardinality(steps))


def data_sharding():
    """The active `keras.distribution` as a `DataSharding`; None when none is
    set (or on a Keras without `keras.distribution`)."""
    distribution_module = getattr(keras, "distribution", None)
    get = getattr(distribution_module, "distribution", None)
    distribution = get() if callable(get) else None
    if distribution is None:
        return None
    check_keras_version(_BATCH_SIZE_SCHEDULER)
    return DataSharding(distribution)


def learning_rate_schedules(optimizer):
    """The learning rates as given to the optimizers that apply updates
    (`sub_optimizers`): floats, variables or schedules, one per optimizer."""
    return [getattr(o, "_learning_rate", None) for o in sub_optimizers(optimizer)]


def random_seed_dtype():
    """The dtype of a Keras seed pair on this backend (`keras.random` takes
    the pair as a `SeedGenerator`'s state; see `models/_weight_noise.py`)."""
    from keras.src.backend import random_seed_dtype as seed_dtype

    return seed_dtype()


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


def all_layers(model):
    """Every layer inside `model`, nested ones included, in Keras' fixed order
    (`Layer._flatten_layers`: Keras has no public recursive walk)."""
    return list(model._flatten_layers(include_self=False, recursive=True))
