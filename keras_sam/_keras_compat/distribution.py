"""`keras.distribution` internals (tested on Keras 3.12 and 3.15)."""

import keras

from keras_sam._keras_compat import check_keras_version
from keras_sam._keras_compat.fit_loop import _BATCH_SIZE_SCHEDULER

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
