"""Refusing `tf.distribute.MultiWorkerMirroredStrategy`, with the way that works.

Keras 3's `fit` fails under `MultiWorkerMirroredStrategy` even for a plain
`keras.Model` (keras-team/keras#20585, open: `_maybe_symbolic_build` calls
`strategy.reduce` on a PerReplica batch, then `reduce_per_replica` fails on
the scalar logs). keras_sam's models therefore stop before the first step
with an error that names the supported multi-process path: the JAX backend
with `keras.distribution` (README, "More than one machine").
"""

import sys

import keras

MULTI_WORKER_ERROR = (
    "{name} cannot train under tf.distribute.MultiWorkerMirroredStrategy "
    "({where}): Keras 3's fit() does not work under that strategy, not even "
    "for a plain keras.Model (keras-team/keras#20585). To train on more than "
    "one machine or process, use the JAX backend with keras.distribution: "
    "KERAS_BACKEND=jax, then in every process "
    "keras.distribution.initialize(job_addresses='HOST:PORT', "
    "num_processes=N, process_id=I) and "
    "keras.distribution.set_distribution(keras.distribution.DataParallel("
    "devices=jax.devices())), every process fitting the same full tf.data "
    "pipeline batched with the global batch size (see the README section "
    "'More than one machine'). tf.distribute.MirroredStrategy (one machine, "
    "several devices) is supported."
)


def _is_multi_worker(strategy):
    tf = sys.modules.get("tensorflow")
    if tf is None or strategy is None:
        return False
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def check_not_multi_worker(model):
    """Raises RuntimeError if `model` was created, or is being fit, under a
    `tf.distribute.MultiWorkerMirroredStrategy` (TensorFlow backend)."""
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    # The TF trainer's `distribute_strategy`: the strategy in scope when the
    # model was created, else the one in scope now (fit inside its scope).
    strategies = [getattr(model, "distribute_strategy", None)]
    if tf.distribute.has_strategy():
        strategies.append(tf.distribute.get_strategy())
    if any(_is_multi_worker(strategy) for strategy in strategies):
        raise RuntimeError(
            MULTI_WORKER_ERROR.format(
                name=type(model).__name__,
                where="the model was created, or fit() is called, in its scope",
            )
        )
