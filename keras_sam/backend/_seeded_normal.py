"""`standard_normal(shape, seed, dtype)` through `keras.random.normal`, for
the backends whose draws do not depend on how the step is compiled (JAX,
PyTorch). TensorFlow's do (XLA draws other numbers than the CPU kernels for
one seed): it has its own in `backend/tensorflow.py`."""

import keras

from keras_sam._keras_compat import layers as layer_internals


class _SeedValue(keras.random.SeedGenerator):
    """A seed for `keras.random.*` given as a tensor (Keras takes an int or a
    `SeedGenerator`; an int is a Python constant, fixed when traced). It
    holds no variable: `next()` returns the tensor."""

    def __init__(self, value):  # no state variable: nothing to track or save
        self._value = value

    def next(self, ordered=True):
        return self._value


def standard_normal(shape, seed, dtype="float32"):
    """Standard normal draws of `shape` from a seed pair `seed` (an int32
    tensor of shape (2,)); the same numbers wherever the step runs."""
    value = keras.ops.cast(seed, layer_internals.random_seed_dtype())
    return keras.random.normal(tuple(shape), dtype=dtype, seed=_SeedValue(value))
