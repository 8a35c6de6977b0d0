"""Gaussian weight noise that is a pure function of `(seed, step)`.

Random weight perturbation (RWP, Flat-LoRA) draws fresh noise every step. It
is never stored: it is drawn again from the wrapper's `seed` and the
optimizer's step count whenever it is needed, so every replica and device of
a step draws the same noise, a resumed run (`BackupAndRestore`) draws the
noise the uninterrupted run drew, and a test can replay it
(`RWPModel.standard_normals(step)`).
"""

import keras
from keras import ops

from keras_sam import _keras_compat


class _SeedValue(keras.random.SeedGenerator):
    """A seed for `keras.random.*` given as a tensor (Keras takes an int or a
    `SeedGenerator`; an int is a Python constant, fixed when traced). It
    holds no variable: `next()` returns the tensor."""

    def __init__(self, value):  # no state variable: nothing to track or save
        self._value = value

    def next(self, ordered=True):
        return self._value


def standard_normals(shapes, seed, step, dtype="float32"):
    """One standard normal tensor per shape, drawn from `(seed, step)`.

    The `i`-th tensor of step `t` uses the Keras seed `[seed, t * len(shapes)
    + i]`: distinct for every tensor of every step (also on PyTorch, whose
    Keras backend seeds with the sum of the pair).

    Args:
        shapes: list of shapes.
        seed: a Python int.
        step: the step count, an integer scalar tensor (or int).
        dtype: of the draws.

    Returns:
        A list of tensors.
    """
    seed_dtype = _keras_compat.random_seed_dtype()
    counter = ops.cast(step, "int32") * len(shapes)
    draws = []
    for i, shape in enumerate(shapes):
        value = ops.cast(ops.stack([ops.cast(seed, "int32"), counter + i]), seed_dtype)
        draws.append(keras.random.normal(tuple(shape), dtype=dtype, seed=_SeedValue(value)))
    return draws
