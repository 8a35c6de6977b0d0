"""JAX gradients. Keras' JAX trainer is pure and shards the global batch itself
(`keras.distribution.DataParallel`), so a step always sees the global batch:
the perturbation is the synchronized one, and there is no replica context."""

import contextlib

import jax

from keras_sam.backend._single_replica import all_reduce  # noqa: F401
from keras_sam.backend._single_replica import loop_over  # noqa: F401
from keras_sam.backend._single_replica import num_replicas  # noqa: F401
from keras_sam.backend._stateless_random import random_state  # noqa: F401
from keras_sam.backend._stateless_random import set_random_state  # noqa: F401

__all__ = [
    "value_and_grad",
    "hessian_vector_product",
    "num_replicas",
    "all_reduce",
    "loop_over",
    "read_values",
    "no_grad",
    "random_state",
    "set_random_state",
]


def value_and_grad(fn):
    def wrapped(values, *args, **kwargs):
        return jax.value_and_grad(
            lambda v: fn(v, *args, **kwargs), has_aux=True
        )(list(values))

    return wrapped


def hessian_vector_product(fn, values, vector):
    _, tangent = jax.jvp(jax.grad(fn), (list(values),), (list(vector),))
    return tangent


def read_values(variables):
    return [v.value for v in variables]


def no_grad():
    return contextlib.nullcontext()
