"""Sharpness measures of a trained Keras model.

Three diagnostics of the loss landscape around the current weights `w`:

- `worst_case_sharpness`: the mean over batches `B` of
  `max_{|delta_j| <= rho} L_B(w + delta) - L_B(w)` (L-infinity ball over all
  trainable weights; the adaptive variant uses `|delta_j| <= rho * |w_j|`),
  maximized with Auto-PGD (Andriushchenko et al., 2023, "A modern look at the
  relationship between sharpness and generalization").
- `full_gradient_norm`: `||grad f_S(w)||_2`, with `f_S` the mean loss over the
  whole data set.
- `hessian_max_eigenvalue`: the eigenvalue of largest magnitude of the Hessian
  of `f_S`, by the Lanczos method on Hessian-vector products.

All three evaluate the model at given weights inside a `keras.StatelessScope`
(every model variable is mapped to a tensor read once at the start), in
inference mode (`training=False`), so no variable of the model, its optimizer
or its seed generators is ever written. Under `tf.distribute.MirroredStrategy`
they may be called from cross-replica context (outside or inside
`strategy.scope()`, e.g. from a callback): the mirrored values are read once
and the computation runs on one device; losses are reduced here, not by the
Keras loss, so the strategy's per-replica loss scaling is never applied.

Loss conventions (shared by the three functions):

- `loss` is a `keras.losses.Loss` instance, a loss name (`"mse"`), a loss
  config dict, or a callable `loss(y_true, y_pred)`. Per-element values come
  from `Loss.call` (or the callable), and are weighted by `sample_weight` (and
  by the Keras mask of `y_pred`, if any) the way Keras' `reduce_weighted_values`
  does.
- A batch loss is `sum(weighted values) / normalizer`, and the data set loss is
  `sum over batches of sum(weighted values) / sum of normalizers`, where the
  normalizer is the number of loss elements (unmasked ones if masked) — the
  `"sum_over_batch_size"` convention — or, for a `Loss` whose reduction is
  `"mean_with_sample_weight"` and batches carrying sample weights, the sum of
  the sample weights. `"sum"` and `"none"` reductions are treated like
  `"sum_over_batch_size"`: these measures are defined on the mean loss.
- A callable returning a scalar is taken as the batch MEAN over the batch's
  examples (it cannot be combined with sample weights).
- `include_model_losses=False` (default) uses the data loss only. With `True`,
  `sum(model.losses)` (weight regularizers evaluated at the perturbed weights,
  `add_loss` and activity-regularizer terms) is added to every batch loss; in
  the data set mean each batch's term is weighted by its normalizer, so a
  weight regularizer is added exactly once.

Data: a `tf.data.Dataset` or any iterable of `(x, y)` / `(x, y, sample_weight)`
batches, or a tuple of arrays `(x, y)` / `(x, y, sample_weight)` that is split
into batches of `batch_size` in order (`x` may be a list or dict of arrays, `y`
an array or a dict). `steps` caps the number of batches (required for infinite
datasets). A one-shot iterator (generator) is cached in memory on its first
pass when a measure needs several passes.

Registry: `SharpnessMonitor` computes measures by name through
`get_measure(name)`; `measure_names()` lists them (the built-in `MEASURES`
first). `register_measure(name, fn)` adds a measure of your own, a function
`fn(model, data, loss, **settings) -> float`, which the monitor then logs like
the built-in ones; `unregister_measure(name)` removes it. The calling
convention is in the docstring of `register_measure`.

Layout: `_data` (the `Batches` adapter), `_objective` (loss reduction, model
variables, the objective, and the ONLY place that builds compiled functions,
through `keras_sam.backend.compile`, cached per model), `worst_case`
(Auto-PGD), `gradient_norm`, `curvature` (Lanczos) and `_registry`.
"""

from keras_sam.sharpness._data import Batches
from keras_sam.sharpness._objective import LossSpec as _LossSpec
from keras_sam.sharpness._registry import MEASURE_SETTINGS
from keras_sam.sharpness._registry import MEASURES
from keras_sam.sharpness._registry import get_measure
from keras_sam.sharpness._registry import measure_names
from keras_sam.sharpness._registry import register_measure
from keras_sam.sharpness._registry import unregister_measure
from keras_sam.sharpness.curvature import hessian_max_eigenvalue
from keras_sam.sharpness.gradient_norm import full_gradient_norm
from keras_sam.sharpness.worst_case import worst_case_sharpness

__all__ = [
    "worst_case_sharpness",
    "full_gradient_norm",
    "hessian_max_eigenvalue",
    "MEASURES",
    "MEASURE_SETTINGS",
    "register_measure",
    "unregister_measure",
    "get_measure",
    "measure_names",
    "Batches",
    "check_loss",
]


def check_loss(loss):
    """Checks that the measures can use `loss`; returns it unchanged.

    Args:
        loss: A `keras.losses.Loss` (instance or class), a loss name or
            config dict, or a `callable(y_true, y_pred)`.

    Raises:
        ValueError: naming `loss`, when it is None, unknown or not callable.
    """
    _LossSpec(loss)
    return loss
