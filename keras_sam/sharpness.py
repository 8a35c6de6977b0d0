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
"""

import math
import weakref

import numpy as np

import keras
from keras import ops

from keras_sam import _validation
from keras_sam import backend as sam_backend

__all__ = [
    "worst_case_sharpness",
    "full_gradient_norm",
    "hessian_max_eigenvalue",
    "MEASURES",
]

MEASURES = (
    "worst_case_sharpness",
    "full_gradient_norm",
    "hessian_max_eigenvalue",
)

# Auto-PGD constants (Croce & Hein, 2020), as used for weight-space sharpness
# by Andriushchenko et al. (2023).
_APGD_MOMENTUM = 0.75  # weight of the new step; 0.25 on the previous move
_APGD_OSCILLATION_RATIO = 0.75  # halve if <= 75% of a window's steps improved
_APGD_FIRST_WINDOW = 0.22
_APGD_WINDOW_DECREASE = 0.03
_APGD_MIN_WINDOW = 0.06


# --------------------------------------------------------------------------
# Argument checks.


def _check_model(model):
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


def _check_int(name, value, minimum, allow_none=False):
    """`_validation.integer(name, value, low=minimum)`, kept for callers."""
    return _validation.integer(name, value, low=minimum, allow_none=allow_none)


def _check_positive_float(name, value):
    """`_validation.real(name, value, low=0)`, kept for callers."""
    return _validation.real(name, value, low=0)


def _unique(variables):
    seen = set()
    out = []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


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


class _LossSpec:
    """A loss reduced by this module instead of by Keras."""

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
                raise ValueError(
                    f"`loss` could not be resolved: {loss!r} ({e})"
                ) from None
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
            keras.tree.map_structure(
                lambda t: ops.convert_to_tensor(t, dtype=self.dtype), y_true
            ),
            keras.tree.map_structure(
                lambda t: ops.convert_to_tensor(t, dtype=self.dtype), y_pred
            ),
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
        normalizer = _SumOf(ops.ones_like(values))(
            y_pred, y_pred, count_weight
        )
        return ops.cast(total, "float32"), ops.cast(normalizer, "float32")


def _model_variables(model):
    trainable = _unique(model.trainable_variables)
    ids = {id(v) for v in trainable}
    others = [v for v in _unique(model.variables) if id(v) not in ids]
    return trainable, others


def _make_objective(model, spec, include_model_losses):
    """`f(train_values, other_values, x, y, sw) -> (sum, (sum, normalizer))`.

    `sum` is the batch's weighted loss sum (plus `normalizer * model losses`
    if asked), evaluated at `train_values` without writing any variable:
    every model variable is mapped to a value in a `StatelessScope`. The
    model is held by a weak reference so that cached compiled functions do
    not keep it alive.
    """
    trainable, others = _model_variables(model)
    model_ref = weakref.ref(model)

    def objective(train_values, other_values, x, y, sw):
        mapping = list(zip(trainable, train_values)) + list(
            zip(others, other_values)
        )
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
            y_pred = model_ref()(x, training=False)
            total, normalizer = spec.batch_terms(y, y_pred, sw)
            if include_model_losses:
                extra = [ops.sum(ops.cast(t, "float32")) for t in model_ref().losses]
                if extra:
                    total = total + normalizer * ops.sum(ops.stack(extra))
        return total, (total, normalizer)

    return objective


# Compiled functions, per model (weakly) and per configuration, so that a
# callback measuring every epoch traces once per batch shape, not per call.
_CACHE = weakref.WeakKeyDictionary()
_CACHE_SIZE = 8


def _cached(model, key, build):
    trainable, others = _model_variables(model)
    key = key + (
        tuple(id(v) for v in trainable),
        tuple(id(v) for v in others),
    )
    per_model = _CACHE.setdefault(model, {})
    entry = per_model.get(key)
    if entry is None:
        entry = build()
        per_model[key] = entry
        while len(per_model) > _CACHE_SIZE:
            per_model.pop(next(iter(per_model)))
    return entry


def _read_values(variables):
    """Reads every variable once (mirrored variables: the local copy)."""
    return [ops.convert_to_tensor(v) for v in variables]


def _compile(fn):
    """One traced/jitted function per input signature (batch shape)."""
    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        # No autograph: the loops are explicit (`ops.fori_loop`), and
        # converting the model's code dominated the tracing time.
        return tf.function(fn, autograph=False)
    if name == "jax":
        import jax

        return jax.jit(fn)
    return fn


# --------------------------------------------------------------------------
# Data.


def _is_array(x):
    """An array (numpy, backend tensor) with a batch dimension."""
    shape = getattr(x, "shape", None)
    return shape is not None and len(shape) >= 1 and not isinstance(x, (str, bytes))


def _is_array_tree(x):
    leaves = keras.tree.flatten(x)
    return bool(leaves) and all(_is_array(leaf) for leaf in leaves)


def _num_rows(x):
    return int(keras.tree.flatten(x)[0].shape[0])


def _slice(x, start, stop):
    return keras.tree.map_structure(lambda a: a[start:stop], x)


class _Batches:
    """A re-iterable of `(x, y, sample_weight)` batches of backend tensors.

    One-shot iterators (generators) are cached on their first pass.
    """

    def __init__(self, data, batch_size=128, steps=None):
        self.steps = _validation.integer("steps", steps, low=1, allow_none=True)
        self._arrays = None
        self._cache = None
        self._one_shot = False
        if data is None:
            raise ValueError("`data` must not be None.")
        if (
            isinstance(data, (tuple, list))
            and len(data) in (2, 3)
            and _is_array_tree(data[0])
            and (
                _is_array(data[1])
                or (isinstance(data[1], dict) and _is_array_tree(data[1]))
            )
        ):
            # Arrays (x, y[, sample_weight]); x may be a structure of arrays,
            # y an array or a dict (a tuple y would read as a list of batches).
            self.batch_size = _validation.integer("batch_size", batch_size, low=1)
            x, y = data[0], data[1]
            sw = data[2] if len(data) == 3 else None
            n = _num_rows(x)
            if n == 0:
                raise ValueError("`data` is empty: the arrays have 0 rows.")
            for name, part in (("y", y), ("sample_weight", sw)):
                if part is not None and _num_rows(part) != n:
                    raise ValueError(
                        f"`data`: x has {n} rows but {name} has "
                        f"{_num_rows(part)}."
                    )
            self._arrays = (x, y, sw)
            return
        if hasattr(data, "cardinality"):  # tf.data.Dataset
            try:
                card = int(data.cardinality())
            except Exception:  # pragma: no cover
                card = None
            if card == 0:
                raise ValueError("`data` is an empty dataset.")
            if card == -1 and self.steps is None:
                raise ValueError(
                    "`data` is an infinite dataset: pass `steps` to bound it."
                )
        try:
            it = iter(data)
        except TypeError:
            raise ValueError(
                "`data` must be a tf.data.Dataset, an iterable of (x, y[, "
                "sample_weight]) batches or a tuple of arrays (x, y[, "
                f"sample_weight]). Received: {type(data).__name__}"
            ) from None
        self._one_shot = it is data
        self._data = data

    def _raw(self):
        if self._arrays is not None:
            x, y, sw = self._arrays
            n = _num_rows(x)
            for start in range(0, n, self.batch_size):
                stop = min(start + self.batch_size, n)
                yield (
                    _slice(x, start, stop),
                    _slice(y, start, stop),
                    None if sw is None else _slice(sw, start, stop),
                )
            return
        for batch in self._data:
            x, y, sw = keras.utils.unpack_x_y_sample_weight(batch)
            if y is None:
                raise ValueError(
                    "`data` batches must be (x, y) or (x, y, sample_weight) "
                    "tuples; got a batch without targets."
                )
            yield x, y, sw

    def __iter__(self):
        if self._cache is not None:
            yield from self._cache
            return
        cache = [] if self._one_shot else None
        count = 0
        for x, y, sw in self._raw():
            if self.steps is not None and count >= self.steps:
                break
            batch = (_to_tensors(x), _to_tensors(y), _to_tensors(sw))
            count += 1
            if cache is not None:
                cache.append(batch)
            yield batch
        if count == 0:
            raise ValueError("`data` is empty: it yielded no batches.")
        if cache is not None:
            self._cache = cache


def _to_tensors(x):
    if x is None:
        return None
    return keras.tree.map_structure(ops.convert_to_tensor, x)


# --------------------------------------------------------------------------
# Worst-case sharpness (Auto-PGD in weight space).


def _apgd_schedule(iterations):
    """Checkpoint flags and window lengths of Auto-PGD's step-size rule."""
    window = max(int(_APGD_FIRST_WINDOW * iterations), 1)
    decrease = max(int(_APGD_WINDOW_DECREASE * iterations), 1)
    minimum = max(int(_APGD_MIN_WINDOW * iterations), 1)
    is_check = np.zeros(iterations, dtype="float32")
    windows = np.zeros(iterations, dtype="float32")
    counter = 0
    for i in range(iterations):
        counter += 1
        if counter == window:
            is_check[i] = 1.0
            windows[i] = window
            window = max(window - decrease, minimum)
            counter = 0
    return is_check, windows


def _build_search(model, spec, include_model_losses, rho, adaptive, iterations):
    """Compiled Auto-PGD search of one batch: returns `max gain >= 0`."""
    objective = _make_objective(model, spec, include_model_losses)

    def batch_mean(train_values, other_values, x, y, sw):
        total, (_, normalizer) = objective(train_values, other_values, x, y, sw)
        value = total / normalizer
        return value, value

    value_and_grad = sam_backend.value_and_grad(batch_mean)
    is_check_np, windows_np = _apgd_schedule(iterations)

    def search(train_values, other_values, x, y, sw):
        dtypes = [v.dtype for v in train_values]
        if adaptive:
            scales = [ops.abs(w) for w in train_values]
        else:
            scales = [ops.ones_like(w) for w in train_values]
        radius = [ops.cast(rho, d) for d in dtypes]

        def value_and_u_grad(u):
            values = [w + s * uu for w, s, uu in zip(train_values, scales, u)]
            (value, _), grads = value_and_grad(values, other_values, x, y, sw)
            return ops.cast(value, "float32"), [
                s * ops.cast(g, s.dtype) for s, g in zip(scales, grads)
            ]

        def project(u):
            return [ops.clip(uu, -r, r) for uu, r in zip(u, radius)]

        zeros = [ops.zeros_like(w) for w in train_values]
        f0, g0 = value_and_u_grad(zeros)
        is_check = ops.convert_to_tensor(is_check_np)
        windows = ops.convert_to_tensor(windows_np)
        positions = ops.arange(iterations, dtype="float32")

        def body(i, state):
            (u, u_old, grad, u_best, grad_best, f_best, eta, steps_f,
             reduced_last, f_best_last) = state
            fi = ops.cast(i, "float32")
            a = ops.where(fi > 0, _APGD_MOMENTUM, 1.0)
            move = [uu - uo for uu, uo in zip(u, u_old)]
            u_old = u
            z = project(
                [uu + ops.cast(eta, uu.dtype) * ops.sign(g)
                 for uu, g in zip(u, grad)]
            )
            u = project([
                uu + (zz - uu) * ops.cast(a, uu.dtype)
                + mm * ops.cast(1.0 - a, uu.dtype)
                for uu, zz, mm in zip(u, z, move)
            ])
            f, grad = value_and_u_grad(u)
            steps_f = ops.where(positions == fi, f, steps_f)
            improved = f > f_best
            u_best = [ops.where(improved, uu, ub) for uu, ub in zip(u, u_best)]
            grad_best = [
                ops.where(improved, g, gb) for g, gb in zip(grad, grad_best)
            ]
            f_best = ops.maximum(f, f_best)

            # Auto-PGD step-size rule at the checkpoints.
            check = ops.take(is_check, i) > 0
            window = ops.take(windows, i)
            previous = ops.concatenate(
                [ops.reshape(f0, (1,)), steps_f[:-1]], axis=0
            )
            in_window = ops.logical_and(positions <= fi, positions > fi - window)
            increases = ops.sum(
                ops.where(
                    ops.logical_and(in_window, steps_f > previous), 1.0, 0.0
                )
            )
            oscillating = increases <= window * _APGD_OSCILLATION_RATIO
            no_improvement = ops.logical_and(
                reduced_last < 0.5, f_best_last >= f_best
            )
            reduce = ops.logical_and(
                check, ops.logical_or(oscillating, no_improvement)
            )
            reduced_last = ops.where(
                check, ops.where(reduce, 1.0, 0.0), reduced_last
            )
            f_best_last = ops.where(check, f_best, f_best_last)
            eta = ops.where(reduce, eta * 0.5, eta)
            u = [ops.where(reduce, ub, uu) for ub, uu in zip(u_best, u)]
            grad = [ops.where(reduce, gb, g) for gb, g in zip(grad_best, grad)]
            return (u, u_old, grad, u_best, grad_best, f_best, eta, steps_f,
                    reduced_last, f_best_last)

        state = (
            zeros,
            zeros,
            g0,
            zeros,
            g0,
            f0,
            ops.convert_to_tensor(2.0 * rho, "float32"),
            ops.zeros((iterations,), "float32"),
            ops.convert_to_tensor(1.0, "float32"),
            f0,
        )
        state = ops.fori_loop(0, iterations, body, state)
        f_best = state[5]
        return f_best - f0

    return _compile(search)


def worst_case_sharpness(
    model,
    data,
    loss,
    rho=2e-4,
    adaptive=False,
    iterations=20,
    batch_size=128,
    steps=None,
    include_model_losses=False,
):
    """Worst-case (L-infinity, Auto-PGD) sharpness of a model on data.

    For every batch `B` of `data`, maximizes `L_B(w + delta) - L_B(w)` over
    `|delta_j| <= rho` for all trainable weights `w_j` (adaptive:
    `|delta_j| <= rho * |w_j|`, so weights that are exactly zero are not
    perturbed), with the model in inference mode, and returns the mean of the
    maxima over batches (each batch counts once, whatever its size).

    The maximization is Auto-PGD (Croce & Hein, 2020) in weight space, as in
    Andriushchenko et al. (2023): start at `delta = 0`, sign-gradient steps with
    momentum (weight 0.75 on the new step, 0.25 on the previous move), step
    size starting at `2 * rho` and halved at Auto-PGD's checkpoints when the
    objective oscillates or the best value stalled (the search then restarts
    from the best point), projection onto the box after every step. The best
    `delta` seen is kept, so the value returned is one actually reached
    inside the box, and it is `>= 0` (`delta = 0` is feasible). The whole
    search of one batch runs in one compiled function (one trace per batch
    shape), `iterations + 1` gradient evaluations per batch.

    Args:
        model: A built `keras.Model`. Its variables are only read.
        data: A `tf.data.Dataset` or iterable of `(x, y)` /
            `(x, y, sample_weight)` batches, or a tuple of arrays
            `(x, y[, sample_weight])` split into batches of `batch_size`.
        loss: A `keras.losses.Loss`, loss name or `callable(y_true, y_pred)`.
            See the module docstring for how it is reduced.
        rho: Radius of the L-infinity ball, `>= 0`. Defaults to `2e-4`.
        adaptive: If `True`, the ball is scaled elementwise by `|w|`.
        iterations: Auto-PGD iterations per batch, `>= 1`. Defaults to 20.
        batch_size: Batch size when `data` is a tuple of arrays.
        steps: Optional maximum number of batches to use.
        include_model_losses: If `True`, `L_B` includes `sum(model.losses)`
            (regularizers evaluated at `w + delta`). Defaults to `False`:
            data loss only.

    Returns:
        The mean over batches of the maximal loss increase, a Python float.

    Example:

    ```python
    sharpness = keras_sam.sharpness.worst_case_sharpness(
        model, (x_train[:1024], y_train[:1024]), "sparse_categorical_crossentropy",
        rho=2e-4, batch_size=128)
    ```
    """
    _check_model(model)
    rho = _validation.real("rho", rho, low=0)
    iterations = _validation.integer("iterations", iterations, low=1)
    spec = _LossSpec(loss)
    batches = _Batches(data, batch_size=batch_size, steps=steps)

    search = _cached(
        model,
        ("wcs", spec.key, include_model_losses, rho, bool(adaptive), iterations),
        lambda: _build_search(
            model, spec, include_model_losses, rho, bool(adaptive), iterations
        ),
    )
    trainable, others = _model_variables(model)
    train_values = _read_values(trainable)
    other_values = _read_values(others)
    total = 0.0
    count = 0
    for x, y, sw in batches:
        gain = search(train_values, other_values, x, y, sw)
        total += float(ops.convert_to_numpy(gain))
        count += 1
    return total / count


# --------------------------------------------------------------------------
# Full-batch gradient and Hessian.


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
    loss of the whole data set seen as one batch; see the module docstring),
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
    _check_model(model)
    spec = _LossSpec(loss)
    batches = _Batches(data, batch_size=batch_size, steps=steps)
    grad_fn = _cached(
        model,
        ("grad", spec.key, include_model_losses),
        lambda: _compile(
            sam_backend.value_and_grad(
                _make_objective(model, spec, include_model_losses)
            )
        ),
    )
    trainable, others = _model_variables(model)
    train_values = _read_values(trainable)
    other_values = _read_values(others)

    sums = [np.zeros(tuple(v.shape), dtype="float64") for v in trainable]
    normalizer = 0.0
    for x, y, sw in batches:
        (_, (_, norm_b)), grads = grad_fn(train_values, other_values, x, y, sw)
        normalizer += float(ops.convert_to_numpy(norm_b))
        _accumulate(sums, grads)
    _check_normalizer(normalizer)
    return _norm(sums) / normalizer


def _accumulate(sums, tensors):
    """Adds per-batch tensors into float64 NumPy sums, in place."""
    for acc, t in zip(sums, tensors):
        acc += ops.convert_to_numpy(t).astype("float64")


def _norm(arrays):
    """One global L2 norm of a list of NumPy arrays."""
    return math.sqrt(sum(float(np.sum(np.square(a))) for a in arrays))


def _check_normalizer(normalizer):
    if not normalizer > 0:
        raise ValueError(
            "`data` has zero total weight (no loss elements, or sample "
            "weights summing to 0): the mean loss is undefined."
        )


def _build_hvp(model, spec, include_model_losses):
    """Compiled per-batch Hessian-vector product and normalizer."""
    objective = _make_objective(model, spec, include_model_losses)

    def hvp(train_values, other_values, vector, x, y, sw):
        def scalar(values):
            return objective(values, other_values, x, y, sw)[0]

        return sam_backend.hessian_vector_product(scalar, train_values, vector)

    def batch_normalizer(train_values, other_values, x, y, sw):
        return objective(train_values, other_values, x, y, sw)[1][1]

    hvp = _compile(hvp)
    batch_normalizer = _compile(batch_normalizer)
    return hvp, batch_normalizer


# Lanczos breakdown: the Krylov space is invariant (to round-off) when the new
# direction keeps at most this fraction of the norm of `H q`.
_LANCZOS_BREAKDOWN = 1e-10


def _lanczos_ritz(alphas, betas):
    """Largest-magnitude eigenpair of the Lanczos tridiagonal matrix."""
    t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    values, vectors = np.linalg.eigh(t)
    i = int(np.argmax(np.abs(values)))
    return float(values[i]), vectors[:, i]


def hessian_max_eigenvalue(
    model,
    data,
    loss,
    iterations=20,
    tol=1e-5,
    seed=0,
    batch_size=128,
    steps=None,
    include_model_losses=False,
    return_info=False,
):
    """Largest-magnitude Hessian eigenvalue of the mean loss, by Lanczos.

    The Hessian `H` is that of `f_S`, the mean loss over the whole data (as in
    `full_gradient_norm`); each Hessian-vector product accumulates per-batch
    products of the loss SUM (float64) and divides by the total normalizer.
    Starting from a seeded Gaussian vector, the Lanczos method with full
    reorthogonalization builds an orthonormal basis of the Krylov space
    `span(v, Hv, H^2 v, ...)` (one Hessian-vector product per step; the basis
    is kept on the host in float64, one vector of the model's trainable size
    per step) and returns the Ritz value of largest magnitude, which keeps its
    sign (a negative value means the dominant curvature is negative). Unlike
    power iteration, whose error shrinks like `(lambda_2 / lambda_1)^k`, it is
    accurate when the top eigenvalues are close. It stops when the Ritz pair
    `(lambda, v)` has `||Hv - lambda v|| <= tol * |lambda|` (the residual norm
    given by the Lanczos recurrence), when the Krylov space is invariant, or
    after `iterations` products (at most the number of trainable
    parameters). Model in inference mode; a `data` that is a one-shot
    iterator is cached in memory for the repeated passes.

    Args:
        model: A built `keras.Model`. Its variables are only read.
        data: A `tf.data.Dataset` or iterable of `(x, y)` /
            `(x, y, sample_weight)` batches, or a tuple of arrays
            `(x, y[, sample_weight])` split into batches of `batch_size`.
        loss: A `keras.losses.Loss`, loss name or `callable(y_true, y_pred)`.
        iterations: Maximum number of Lanczos steps (Hessian-vector products
            over the whole data), `>= 1`. Defaults to 20.
        tol: Relative tolerance on the residual `||Hv - lambda v||` of the
            returned eigenpair, `>= 0` (`0` runs all iterations unless the
            Krylov space is invariant). Defaults to `1e-5`.
        seed: Seed of the start vector (a private NumPy generator; no Keras
            or TensorFlow random state is touched). Defaults to 0.
        batch_size: Batch size when `data` is a tuple of arrays.
        steps: Optional maximum number of batches to use.
        include_model_losses: If `True`, `f_S` includes `sum(model.losses)`.
            Defaults to `False`: data loss only.
        return_info: If `True`, also return a dict describing the solve.
            Defaults to `False`.

    Returns:
        The eigenvalue estimate, a Python float. With `return_info=True`, a
        tuple `(eigenvalue, info)` where `info` is a dict with keys
        `"num_hvps"` (int: Hessian-vector products over the whole data, each
        one pass over `data`), `"residual"` (float: `||Hv - lambda v||` of
        the returned pair, from the Lanczos recurrence), `"converged"` (bool:
        the residual or invariance test stopped the iteration) and
        `"eigenvector"` (the unit Ritz vector `v`: a list of float64 NumPy
        arrays shaped like `model.trainable_variables`).

    Example:

    ```python
    lam = keras_sam.sharpness.hessian_max_eigenvalue(model, (x, y), "mse")
    lam, info = keras_sam.sharpness.hessian_max_eigenvalue(
        model, (x, y), "mse", iterations=50, return_info=True)
    print(lam, info["num_hvps"], info["residual"])
    ```
    """
    _check_model(model)
    iterations = _check_int("iterations", iterations, 1)
    tol = _check_positive_float("tol", tol)
    spec = _LossSpec(loss)
    batches = _Batches(data, batch_size=batch_size, steps=steps)
    hvp, batch_normalizer = _cached(
        model,
        ("hvp", spec.key, include_model_losses),
        lambda: _build_hvp(model, spec, include_model_losses),
    )
    trainable, others = _model_variables(model)
    train_values = _read_values(trainable)
    other_values = _read_values(others)
    dtypes = [v.dtype for v in train_values]
    shapes = [tuple(v.shape) for v in trainable]
    splits = np.cumsum([int(np.prod(s)) for s in shapes])

    # The normalizer does not depend on the weights: one forward pass.
    normalizer = 0.0
    for x, y, sw in batches:
        value = batch_normalizer(train_values, other_values, x, y, sw)
        normalizer += float(ops.convert_to_numpy(value))
    _check_normalizer(normalizer)

    def unflatten(q):
        parts = np.split(q, splits[:-1])
        return [p.reshape(s) for p, s in zip(parts, shapes)]

    def product(q):
        """`H q` for a flat float64 `q`, as a flat float64 vector."""
        tensors = [
            ops.convert_to_tensor(p, dtype=d)
            for p, d in zip(unflatten(q), dtypes)
        ]
        sums = [np.zeros(s, dtype="float64") for s in shapes]
        for x, y, sw in batches:
            _accumulate(sums, hvp(train_values, other_values, tensors, x, y, sw))
        return np.concatenate([s.ravel() for s in sums]) / normalizer

    rng = np.random.default_rng(_validation.integer("seed", seed, low=0, allow_none=True))
    q = np.concatenate([rng.standard_normal(s).ravel() for s in shapes])
    basis = [q / np.linalg.norm(q)]
    alphas, betas = [], []
    max_steps = min(iterations, int(splits[-1]))  # Krylov dimension <= size.
    converged = False
    num_hvps = 0
    while num_hvps < max_steps:
        w = product(basis[-1])
        num_hvps += 1
        scale = float(np.linalg.norm(w))
        if not math.isfinite(scale):  # Non-finite curvature: no estimate.
            eigenvalue, residual = math.nan, math.nan
            ritz = np.full(len(basis), math.nan)
            break
        alphas.append(float(w @ basis[-1]))
        for _ in range(2):  # Full reorthogonalization; twice is enough.
            for b in basis:
                w -= (b @ w) * b
        beta = float(np.linalg.norm(w))
        eigenvalue, ritz = _lanczos_ritz(alphas, betas)
        residual = beta * abs(float(ritz[-1]))
        invariant = beta <= _LANCZOS_BREAKDOWN * scale
        if residual <= tol * abs(eigenvalue) or invariant:
            converged = True
            break
        if num_hvps < max_steps:
            betas.append(beta)
            basis.append(w / beta)
    if not return_info:
        return eigenvalue
    vector = sum(c * b for c, b in zip(ritz, basis))
    info = {
        "num_hvps": num_hvps,
        "residual": residual,
        "converged": converged,
        "eigenvector": unflatten(vector),
    }
    return eigenvalue, info
