"""TensorFlow gradients and `tf.distribute` reductions."""

import contextlib

import tensorflow as tf

__all__ = [
    "value_and_grad",
    "hessian_vector_product",
    "num_replicas",
    "all_reduce",
    "read_values",
    "no_grad",
]


def value_and_grad(fn):
    def wrapped(values, *args, **kwargs):
        values = list(values)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(values)
            value, aux = fn(values, *args, **kwargs)
        grads = tape.gradient(
            value, values, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return (value, aux), grads

    return wrapped


def hessian_vector_product(fn, values, vector):
    values = list(values)
    with tf.GradientTape(watch_accessed_variables=False) as outer:
        outer.watch(values)
        with tf.GradientTape(watch_accessed_variables=False) as inner:
            inner.watch(values)
            value = fn(values)
        grads = inner.gradient(
            value, values, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        dot = tf.add_n(
            [tf.reduce_sum(g * tf.stop_gradient(v)) for g, v in zip(grads, vector)]
        )
    return outer.gradient(
        dot, values, unconnected_gradients=tf.UnconnectedGradients.ZERO
    )



def num_replicas():
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return 1
    return tf.distribute.get_replica_context().num_replicas_in_sync


def all_reduce(tensors, reduction):
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if num_replicas() == 1:
        return list(tensors)
    op = tf.distribute.ReduceOp.SUM if reduction == "sum" else tf.distribute.ReduceOp.MEAN
    return tf.distribute.get_replica_context().all_reduce(op, list(tensors))


def read_values(variables):
    """The current values of Keras variables, as plain tensors."""
    return [tf.convert_to_tensor(v.value) for v in variables]


def no_grad():
    return contextlib.nullcontext()
