"""Worst-case (L-infinity) sharpness, maximized with Auto-PGD in weight space.

`worst_case_sharpness` runs the whole search of one batch in one compiled
function (built here as a plain function, compiled and cached by
`keras_sam.sharpness._objective.compiled`).
"""

import numpy as np
from keras import ops

from keras_sam import _validation
from keras_sam import backend as sam_backend
from keras_sam.sharpness import _objective
from keras_sam.sharpness._data import Batches

__all__ = ["worst_case_sharpness"]

# Auto-PGD constants (Croce & Hein, 2020), as used for weight-space sharpness
# by Andriushchenko et al. (2023).
_APGD_MOMENTUM = 0.75  # weight of the new step; 0.25 on the previous move
_APGD_OSCILLATION_RATIO = 0.75  # halve if <= 75% of a window's steps improved
_APGD_FIRST_WINDOW = 0.22
_APGD_WINDOW_DECREASE = 0.03
_APGD_MIN_WINDOW = 0.06


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
    """Auto-PGD search of one batch (to compile): returns `max gain >= 0`."""
    objective = _objective.make_objective(model, spec, include_model_losses)

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
            (u, u_old, grad, u_best, grad_best, f_best, eta, steps_f, reduced_last, f_best_last) = (
                state
            )
            fi = ops.cast(i, "float32")
            a = ops.where(fi > 0, _APGD_MOMENTUM, 1.0)
            move = [uu - uo for uu, uo in zip(u, u_old)]
            u_old = u
            z = project([uu + ops.cast(eta, uu.dtype) * ops.sign(g) for uu, g in zip(u, grad)])
            u = project(
                [
                    uu + (zz - uu) * ops.cast(a, uu.dtype) + mm * ops.cast(1.0 - a, uu.dtype)
                    for uu, zz, mm in zip(u, z, move)
                ]
            )
            f, grad = value_and_u_grad(u)
            steps_f = ops.where(positions == fi, f, steps_f)
            improved = f > f_best
            u_best = [ops.where(improved, uu, ub) for uu, ub in zip(u, u_best)]
            grad_best = [ops.where(improved, g, gb) for g, gb in zip(grad, grad_best)]
            f_best = ops.maximum(f, f_best)

            # Auto-PGD step-size rule at the checkpoints.
            check = ops.take(is_check, i) > 0
            window = ops.take(windows, i)
            previous = ops.concatenate([ops.reshape(f0, (1,)), steps_f[:-1]], axis=0)
            in_window = ops.logical_and(positions <= fi, positions > fi - window)
            increases = ops.sum(ops.where(ops.logical_and(in_window, steps_f > previous), 1.0, 0.0))
            oscillating = increases <= window * _APGD_OSCILLATION_RATIO
            no_improvement = ops.logical_and(reduced_last < 0.5, f_best_last >= f_best)
            reduce = ops.logical_and(check, ops.logical_or(oscillating, no_improvement))
            reduced_last = ops.where(check, ops.where(reduce, 1.0, 0.0), reduced_last)
            f_best_last = ops.where(check, f_best, f_best_last)
            eta = ops.where(reduce, eta * 0.5, eta)
            u = [ops.where(reduce, ub, uu) for ub, uu in zip(u_best, u)]
            grad = [ops.where(reduce, gb, g) for gb, g in zip(grad_best, grad)]
            return (
                u,
                u_old,
                grad,
                u_best,
                grad_best,
                f_best,
                eta,
                steps_f,
                reduced_last,
                f_best_last,
            )

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

    return search


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
            See the docstring of `keras_sam.sharpness` for how it is
            reduced.
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
    _objective.check_model(model)
    rho = _validation.real("rho", rho, low=0)
    iterations = _validation.integer("iterations", iterations, low=1)
    spec = _objective.LossSpec(loss)
    batches = Batches(data, batch_size=batch_size, steps=steps)

    search = _objective.compiled(
        model,
        ("wcs", spec.key, include_model_losses, rho, bool(adaptive), iterations),
        lambda: _build_search(model, spec, include_model_losses, rho, bool(adaptive), iterations),
    )
    train_values, other_values = _objective.read_model_values(model)
    total = 0.0
    count = 0
    for x, y, sw in batches:
        gain = search(train_values, other_values, x, y, sw)
        total += float(ops.convert_to_numpy(gain))
        count += 1
    return total / count
