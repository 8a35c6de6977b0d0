"""The loss the measures differentiate, and the cache of its compiled functions.

- Loss reduction: `LossSpec` turns a loss into per-batch
  `(weighted_sum, normalizer)` terms (the conventions are in the docstring of
  `keras_sam.sharpness`).
- Model variables: `model_variables` lists them, `read_model_values` reads
  their values, once per measure call (the measures pass the values down to
  every batch and iteration; no compiled function reads a variable).
- Objective: `make_objective` evaluates the batch loss at given values in a
  `keras.StatelessScope`, in inference mode, writing no variable.
- Compile-and-cache: `compiled` is the ONLY place in `keras_sam.sharpness`
  that builds backend-compiled functions (`tf.function` / `jax.jit`, through
  `keras_sam.backend.compile`). The measure modules hand it plain Python
  functions; it compiles them and caches them per model (weakly) and per
  configuration, so a callback measuring every epoch traces once per batch
  shape, not once per call.
"""

import weakref

import keras
from keras import ops

from keras_sam import _validation
from keras_sam import backend as sam_backend

__all__ = [
    "LossSpec",
    "check_model",
    "check_normalizer",
    "model_variables",
    "read_model_values",
    "make_objective",
    "compiled",
]


# --------------------------------------------------------------------------
# The model and its variables.


def _unique(variables):
    seen = set()
    out = []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def check_model(model):
    """Raises the package's `ValueError` unless `model` can be measured."""
    if not isinstance(model, keras.Model):
        raise _validation.error("model", "a keras.Model instance", model)
    if not model.built:
        raise _validation.error(
            "model",
            "built before measuring its sharpness (call it on data, or build "
            "it with an input shape)",
            model,
        )
    if not _unique(model.trainable_variables):
        raise _validation.error("model", "a model with trainable variables", model)


def model_variables(model):
    """`(trainable, others)`: the model's variables, each listed once."""
    trainable = _unique(model.trainable_variables)
    ids = {id(v) for v in trainable}
    others = [v for v in _unique(model.variables) if id(v) not in ids]
    return trainable, others


def _read_values(variables):
    """Reads every variable once (mirrored variables: the local copy)."""
    return [ops.convert_to_tensor(v) for v in variables]


def read_model_values(model):
    """`(train_values, other_values)`: the values of `model_variables(model)`.

    Every measure calls this once per call and passes the values to its
    compiled functions, batch after batch, so all batches and iterations of
    one measurement see the same weights, read once.
    """
    trainable, others = model_variables(model)
    return _read_values(trainable), _read_values(others)


# --------------------------------------------------------------------------
# Loss handling: per-batch (weighted sum, normalizer).


class _SumOf(keras.losses.Loss):
    """Sums precomputed per-element values the way a Keras loss weights them.

    `Loss.__call__` merges the Keras mask of `y_pred` (and of the values) with
    the sample weights and aligns ranks exactly as for any Keras loss; the
    `"sum"` reduction skips the per-replica scaling that mean reductions apply
    under a `tf.distribute` strategy scope.
    """

    def __init__(self, values):
        super().__init__(name="sharpness_sum", reduction="sum", dtype="float32")
        self._values = values

    def call(self, y_true, y_pred):
        return self._values


class LossSpec:
    """A loss reduced by `keras_sam.sharpness` instead of by Keras.

    Raises a `ValueError` naming `loss` when it is not usable.
    """

    def __init__(self, loss):
        identifier = loss
        self.identifier = identifier
        if loss is None:
            raise ValueError(
                "`loss` is required: a keras.losses.Loss, a loss name or a "
                "callable(y_true, y_pred). Received: loss=None"
            )
        if isinstance(loss, (str, dict)):
            try:
                resolved = keras.losses.get(loss)
            except (ValueError, TypeError) as e:
                raise ValueError(f"`loss` could not be resolved: {loss!r} ({e})") from None
            if resolved is None:
                raise ValueError(f"Unknown `loss`: {loss!r}")
            loss = resolved
        if isinstance(loss, type) and issubclass(loss, keras.losses.Loss):
            loss = loss()
        self.reduction = "sum_over_batch_size"
        self.dtype = keras.backend.floatx()
        if isinstance(loss, keras.losses.Loss):
            self.reduction = loss.reduction
            self.dtype = loss.dtype or self.dtype
            self._fn = loss.call
        elif callable(loss):
            self._fn = loss
        else:
            raise ValueError(
                "`loss` must be a keras.losses.Loss, a loss name or a "
                f"callable(y_true, y_pred). Received: loss={loss!r}"
            )
        self.loss = loss
        # The cache key: the identifier itself when hashable (a name), else
        # its id (the cached closures keep this spec, hence it, alive).
        self.key = identifier if isinstance(identifier, str) else id(identifier)

    def batch_terms(self, y_true, y_pred, sample_weight):
        """Returns `(weighted_sum, normalizer)` as float32 scalars."""
        values = self._fn(
            keras.tree.map_structure(lambda t: ops.convert_to_tensor(t, dtype=self.dtype), y_true),
            keras.tree.map_structure(lambda t: ops.convert_to_tensor(t, dtype=self.dtype), y_pred),
        )
        if len(values.shape) == 0:
            # A scalar: taken as the mean over the batch's examples.
            if sample_weight is not None:
                raise ValueError(
                    "`loss` returned a scalar for a batch with sample weights; "
                    "it must return per-example values for them to apply."
                )
            first = keras.tree.flatten(y_true)[0]
            n = ops.cast(ops.shape(first)[0], "float32")
            return ops.cast(values, "float32") * n, n
        # `y_pred` is passed twice: only its Keras mask matters here.
        total = _SumOf(values)(y_pred, y_pred, sample_weight)
        if self.reduction == "mean_with_sample_weight":
            count_weight = sample_weight
        else:
            count_weight = None
        normalizer = _SumOf(ops.ones_like(values))(y_pred, y_pred, count_weight)
        return ops.cast(total, "float32"), ops.cast(normalizer, "float32")


def check_normalizer(normalizer):
    """Raises a `ValueError` unless the data set's total normalizer is > 0."""
    if not normalizer > 0:
        raise ValueError(
            "`data` has zero total weight (no loss elements, or sample "
            "weights summing to 0): the mean loss is undefined."
        )


# --------------------------------------------------------------------------
# The objective.


def make_objective(model, spec, include_model_losses):
    """`f(train_values, other_values, x, y, sw) -> (sum, (sum, normalizer))`.

    `sum` is the batch's weighted loss sum (plus `normalizer * model losses`
    if asked), evaluated at `train_values` without writing any variable:
    every model variable is mapped to a value in a `StatelessScope`. The
    model is held by a weak reference so that cached compiled functions do
    not keep it alive.
    """
    trainable, others = model_variables(model)
    model_ref = weakref.ref(model)

    def objective(train_values, other_values, x, y, sw):
        mapping = list(zip(trainable, train_values)) + list(zip(others, other_values))
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
            y_pred = model_ref()(x, training=False)
            total, normalizer = spec.batch_terms(y, y_pred, sw)
            if include_model_losses:
                extra = [ops.sum(ops.cast(t, "float32")) for t in model_ref().losses]
                if extra:
                    total = total + normalizer * ops.sum(ops.stack(extra))
        return total, (total, normalizer)

    return objective


# --------------------------------------------------------------------------
# Compile and cache.

# Compiled functions, per model (weakly) and per configuration, so that a
# callback measuring every epoch traces once per batch shape, not per call.
_CACHE = weakref.WeakKeyDictionary()
_CACHE_SIZE = 8


def compiled(model, key, build):
    """The compiled function(s) of `build()` for `model` and `key`, cached.

    Args:
        model: The measured model (a weak key: the cache does not keep it
            alive).
        key: A hashable tuple naming the measure and its configuration; the
            ids of the model's variables are added to it, so a model whose
            variables changed gets new functions.
        build: A callable returning a plain Python function, or a tuple of
            them, of the values read by `read_model_values` and the batch.
            It runs only on a cache miss; each function is then compiled
            with `keras_sam.backend.compile` (one trace per input signature).

    Returns:
        The compiled function, or a tuple of them (as `build` returned).
        At most `_CACHE_SIZE` configurations are kept per model (the oldest
        goes first).
    """
    trainable, others = model_variables(model)
    key = key + (
        tuple(id(v) for v in trainable),
        tuple(id(v) for v in others),
    )
    per_model = _CACHE.setdefault(model, {})
    entry = per_model.get(key)
    if entry is None:
        built = build()
        if isinstance(built, tuple):
            entry = tuple(sam_backend.compile(fn) for fn in built)
        else:
            entry = sam_backend.compile(built)
        per_model[key] = entry
        while len(per_model) > _CACHE_SIZE:
            per_model.pop(next(iter(per_model)))
    return entry
