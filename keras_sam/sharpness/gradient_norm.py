"""The global L2 norm of the full-batch gradient of the mean loss."""

import math

import numpy as np
from keras import ops

from keras_sam import backend as sam_backend
from keras_sam.sharpness import _objective
from keras_sam.sharpness._data import Batches
from keras_sam.sharpness._data import accumulate

__all__ = ["full_gradient_norm"]


def full_gradient_norm(
    model,
    data,
    loss,
    batch_size=128,
    steps=None,
    include_model_losses=False,
):
    """Global L2 norm of the gradient of the mean loss over the whole data.

    Computes `||grad f_S(w)||_2` over all trainable variables, where
    `f_S = sum over batches of weighted loss sums / sum of normalizers` (the
    loss of the whole data set seen as one batch; see the docstring of
    `keras_sam.sharpness`),
    so it is exact for unequal batch sizes. Per-batch gradients of the loss
    SUM are accumulated in float64. Model in inference mode.

    Args:
        model: A built `keras.Model`. Its variables are only read.
        data: A `tf.data.Dataset` or iterable of `(x, y)` /
            `(x, y, sample_weight)` batches, or a tuple of arrays
            `(x, y[, sample_weight])` split into batches of `batch_size`.
        loss: A `keras.losses.Loss`, loss name or `callable(y_true, y_pred)`.
        batch_size: Batch size when `data` is a tuple of arrays.
        steps: Optional maximum number of batches to use.
        include_model_losses: If `True`, `f_S` includes `sum(model.losses)`.
            Defaults to `False`: data loss only.

    Returns:
        The gradient norm, a Python float.

    Example:

    ```python
    norm = keras_sam.sharpness.full_gradient_norm(model, dataset, "mse")
    ```
    """
    _objective.check_model(model)
    spec = _objective.LossSpec(loss)
    batches = Batches(data, batch_size=batch_size, steps=steps)
    grad_fn = _objective.compiled(
        model,
        ("grad", spec.key, include_model_losses),
        lambda: sam_backend.value_and_grad(
            _objective.make_objective(model, spec, include_model_losses)
        ),
    )
    trainable, _ = _objective.model_variables(model)
    train_values, other_values = _objective.read_model_values(model)

    sums = [np.zeros(tuple(v.shape), dtype="float64") for v in trainable]
    normalizer = 0.0
    for x, y, sw in batches:
        (_, (_, norm_b)), grads = grad_fn(train_values, other_values, x, y, sw)
        normalizer += float(ops.convert_to_numpy(norm_b))
        accumulate(sums, grads)
    _objective.check_normalizer(normalizer)
    return _norm(sums) / normalizer


def _norm(arrays):
    """One global L2 norm of a list of NumPy arrays."""
    return math.sqrt(sum(float(np.sum(np.square(a))) for a in arrays))
