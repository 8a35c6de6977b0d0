"""Gaussian weight noise that is a pure function of `(seed, step)`.

Random weight perturbation (RWP, Flat-LoRA) draws fresh noise every step. It
is never stored: it is drawn again from the wrapper's `seed` and the
optimizer's step count whenever it is needed, so every replica and device of
a step draws the same noise, a resumed run (`BackupAndRestore`) draws the
noise the uninterrupted run drew, and a test can replay it
(`RWPModel.standard_normals(step)`).
"""

from keras import ops

from keras_sam import backend as sam_backend


def standard_normals(shapes, seed, step, dtype="float32"):
    """One standard normal tensor per shape, drawn from `(seed, step)`.

    The `i`-th tensor of step `t` uses the seed pair `[seed, t * len(shapes)
    + i]`: distinct for every tensor of every step (also on PyTorch, whose
    Keras backend seeds with the sum of the pair). The numbers do not depend
    on how the step is compiled (`sam_backend.standard_normal`).

    Args:
        shapes: list of shapes.
        seed: a Python int.
        step: the step count, an integer scalar tensor (or int).
        dtype: of the draws.

    Returns:
        A list of tensors.
    """
    counter = ops.cast(step, "int32") * len(shapes)
    draws = []
    for i, shape in enumerate(shapes):
        pair = ops.stack([ops.cast(seed, "int32"), counter + i])
        draws.append(sam_backend.standard_normal(shape, pair, dtype))
    return draws
