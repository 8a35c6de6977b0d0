"""TensorFlow gradients, `tf.distribute` reductions and a graph loop.

Gradients are always dense: TensorFlow returns `tf.IndexedSlices` for an
`Embedding` (a gather), which the SAM math cannot add to a weight or multiply;
`tf.convert_to_tensor` scatters them into a dense tensor of the variable's
shape, with the same values a sparse update would apply.
"""

import contextlib

import tensorflow as tf
from keras import tree

from keras_sam.backend._loops import python_loop
from keras_sam.backend._stateless_random import random_state  # noqa: F401
from keras_sam.backend._stateless_random import set_random_state  # noqa: F401

__all__ = [
    "value_and_grad",
    "hessian_vector_product",
    "compile",
    "num_replicas",
    "all_reduce",
    "read_values",
    "no_grad",
    "replica_loss",
    "keras_loss_share",
    "loop_over",
    "random_state",
    "set_random_state",
    "standard_normal",
]


def _dense(grads):
    return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]


def value_and_grad(fn):
    def wrapped(values, *args, **kwargs):
        values = list(values)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(values)
            value, aux = fn(values, *args, **kwargs)
        grads = tape.gradient(value, values, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return (value, aux), _dense(grads)

    return wrapped


def hessian_vector_product(fn, values, vector):
    values = list(values)
    with tf.GradientTape(watch_accessed_variables=False) as outer:
        outer.watch(values)
        with tf.GradientTape(watch_accessed_variables=False) as inner:
            inner.watch(values)
            value = fn(values)
        grads = _dense(
            inner.gradient(value, values, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        )
        dot = tf.add_n([tf.reduce_sum(g * tf.stop_gradient(v)) for g, v in zip(grads, vector)])
    return _dense(outer.gradient(dot, values, unconnected_gradients=tf.UnconnectedGradients.ZERO))


def compile(fn):  # noqa: A001 (the backend's name for the operation)
    """`fn` as a `tf.function`: one graph per input signature (batch shape).

    No autograph: callers write their loops with `ops.fori_loop`, and
    converting the model's code dominated the tracing time.
    """
    return tf.function(fn, autograph=False)


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


def replica_loss(loss):
    """Keras' TensorFlow trainer already divides each replica's loss by the
    replica count (`scale_loss_for_distribution`)."""
    return loss


def loop_over(n, body, carry):
    """Runs `carry, out = body(i, carry)` for `i` in `range(n)`.

    A Python loop when `n` is an int; a `tf.while_loop` when `n` is a tensor
    (a batch size known only when the step runs). The first iteration runs
    before the loop, so its outputs give the dtypes of the arrays that
    collect the others.

    Returns:
        `(carry, outs)`: the last carry and every iteration's outputs, each
        leaf concatenated along axis 0.
    """
    if isinstance(n, int):
        return python_loop(n, body, carry)
    carry, first = body(tf.constant(0, n.dtype), carry)
    flat = tree.flatten(first)
    arrays = [tf.TensorArray(t.dtype, size=n, infer_shape=False).write(0, t) for t in flat]

    def step(i, carry, arrays):
        carry, out = body(i, carry)
        arrays = [a.write(i, t) for a, t in zip(arrays, tree.flatten(out))]
        return i + 1, carry, arrays

    _, carry, arrays = tf.while_loop(
        lambda i, *_: i < n, step, (tf.constant(1, n.dtype), carry, arrays)
    )
    outs = []
    for a, t in zip(arrays, flat):
        out = a.concat()
        out.set_shape([None] + list(t.shape[1:]))  # the concat loses the rank
        outs.append(out)
    return carry, tree.pack_sequence_as(first, outs)


def keras_loss_share(value):
    """A batch-mean term as Keras' compiled loss scales it on this replica:
    divided by the replica count, as `scale_loss_for_distribution` does."""
    return value / num_replicas()


def standard_normal(shape, seed, dtype="float32"):
    """Standard normal draws of `shape` from a seed pair `seed`, the same
    numbers with and without XLA: TensorFlow's stateless normal (and
    uniform) ops draw other numbers under `jit_compile` than on the CPU
    kernels for one seed, its raw Philox bits do not; so the bits come from
    `stateless_uniform_full_int` and become normals by Box-Muller here."""
    shape = tuple(int(d) for d in shape)
    size = 1
    for d in shape:
        size *= d
    bits = tf.random.stateless_uniform(
        (2, size), seed=tf.cast(seed, tf.int64), minval=None, maxval=None,
        dtype=tf.uint32, alg="philox",
    )  # fmt: skip
    # 24 high bits -> (0, 1), never 0 (the log's argument).
    uniform = (tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) + 0.5) / float(1 << 24)
    radius = tf.sqrt(-2.0 * tf.math.log(uniform[0]))
    normal = radius * tf.cos(2.0 * 3.141592653589793 * uniform[1])
    return tf.cast(tf.reshape(normal, shape), dtype)
