"""JAX gradients, and replicas under `keras.distribution.DataParallel`.

Keras' JAX trainer is pure and shards the global batch itself, so a step sees
the global batch. For a per-device perturbation (the default, as on
TensorFlow's MirroredStrategy), `per_device` runs the step on each device's
shard with `jax.shard_map`; inside it `num_replicas` and `all_reduce` see the
devices as replicas, with the semantics of a `tf.distribute` replica context:
each device's loss is its local mean divided by the device count, so its
gradients SUM to the global one."""

import contextlib

import jax

from keras_sam.backend._seeded_normal import standard_normal  # noqa: F401
from keras_sam.backend._single_replica import loop_over  # noqa: F401
from keras_sam.backend._stateless_random import random_state  # noqa: F401
from keras_sam.backend._stateless_random import set_random_state  # noqa: F401

__all__ = [
    "standard_normal",
    "value_and_grad",
    "hessian_vector_product",
    "compile",
    "num_replicas",
    "all_reduce",
    "loop_over",
    "read_values",
    "no_grad",
    "replica_loss",
    "keras_loss_share",
    "per_device_mesh",
    "per_device_count",
    "batch_devices_without_per_device_step",
    "per_device",
    "random_state",
    "set_random_state",
]


def value_and_grad(fn):
    def wrapped(values, *args, **kwargs):
        return jax.value_and_grad(lambda v: fn(v, *args, **kwargs), has_aux=True)(list(values))

    return wrapped


def hessian_vector_product(fn, values, vector):
    _, tangent = jax.jvp(jax.grad(fn), (list(values),), (list(vector),))
    return tangent


def compile(fn):  # noqa: A001 (the backend's name for the operation)
    """`fn` under `jax.jit`: one compiled function per input signature."""
    return jax.jit(fn)


def read_values(variables):
    return [v.value for v in variables]


def no_grad():
    return contextlib.nullcontext()


_REPLICA_AXES = []  # (axis name, size) of the per-device step being traced


def num_replicas():
    return _REPLICA_AXES[-1][1] if _REPLICA_AXES else 1


def all_reduce(tensors, reduction):
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if not _REPLICA_AXES:
        return list(tensors)
    reduce = jax.lax.psum if reduction == "sum" else jax.lax.pmean
    return [reduce(t, _REPLICA_AXES[-1][0]) for t in tensors]


def replica_loss(loss):
    """A device's share of the global mean loss inside `per_device`."""
    return loss / num_replicas()


def per_device_count():
    """Devices that each perturb with their own shard (1 without DataParallel)."""
    mesh = per_device_mesh()
    return 1 if mesh is None else mesh[0].shape[mesh[1]]


def batch_devices_without_per_device_step():
    """Devices the batch is split over by a `keras.distribution` other than
    `DataParallel` (`ModelParallel`: its batch axis), where the step runs on
    global arrays and no device can perturb with its own shard; 1 otherwise."""
    import keras

    distribution = keras.distribution.distribution()
    if distribution is None or isinstance(distribution, keras.distribution.DataParallel):
        return 1
    mesh = distribution.device_mesh
    axis = getattr(distribution, "batch_dim_name", None)
    if axis not in mesh.axis_names:
        return 1
    return mesh.shape[mesh.axis_names.index(axis)]


def per_device_mesh():
    """`(mesh, axis)` of the active `keras.distribution.DataParallel` over more
    than one device, else None."""
    import keras

    distribution = keras.distribution.distribution()
    if not isinstance(distribution, keras.distribution.DataParallel):
        return None
    mesh = distribution.device_mesh
    if mesh.devices.size < 2:
        return None
    return mesh.backend_mesh, distribution.batch_dim_name


def per_device(fn, mesh, axis, replicated, sharded):
    """`fn(replicated, sharded)` on every device with its shard of `sharded`.

    `fn` returns `(same, local)`: `same` must be equal on every device (reduce
    it with `all_reduce` inside `fn`), `local` is per example and is put back
    together along the batch axis.
    """
    size = mesh.shape[axis]

    def body(replicated, sharded):
        _REPLICA_AXES.append((axis, size))
        try:
            return fn(replicated, sharded)
        finally:
            _REPLICA_AXES.pop()

    P = jax.sharding.PartitionSpec
    specs = dict(mesh=mesh, in_specs=(P(), P(axis)), out_specs=(P(), P(axis)))
    if hasattr(jax, "shard_map"):
        mapped = jax.shard_map(body, check_vma=False, **specs)
    else:  # JAX before 0.7
        from jax.experimental.shard_map import shard_map

        mapped = shard_map(body, check_rep=False, **specs)
    return mapped(replicated, sharded)


def keras_loss_share(value):
    """A batch-mean term as the compiled loss holds it (`replica_loss`
    divides the total by the device count afterwards)."""
    return value
