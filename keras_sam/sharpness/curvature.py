"""Curvature: the largest-magnitude Hessian eigenvalue of the mean loss, by
Lanczos on Hessian-vector products (compiled per batch, accumulated on the
host in float64)."""

import math

import numpy as np
from keras import ops

from keras_sam import _validation
from keras_sam import backend as sam_backend
from keras_sam.sharpness import _objective
from keras_sam.sharpness._data import Batches
from keras_sam.sharpness._data import accumulate

__all__ = ["hessian_max_eigenvalue"]


def _build_hvp(model, spec, include_model_losses):
    """Per-batch Hessian-vector product and normalizer (to compile)."""
    objective = _objective.make_objective(model, spec, include_model_losses)

    def hvp(train_values, other_values, vector, x, y, sw):
        def scalar(values):
            return objective(values, other_values, x, y, sw)[0]

        return sam_backend.hessian_vector_product(scalar, train_values, vector)

    def batch_normalizer(train_values, other_values, x, y, sw):
        return objective(train_values, other_values, x, y, sw)[1][1]

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
    _objective.check_model(model)
    iterations = _validation.integer("iterations", iterations, low=1)
    tol = _validation.real("tol", tol, low=0)
    spec = _objective.LossSpec(loss)
    batches = Batches(data, batch_size=batch_size, steps=steps)
    hvp, batch_normalizer = _objective.compiled(
        model,
        ("hvp", spec.key, include_model_losses),
        lambda: _build_hvp(model, spec, include_model_losses),
    )
    trainable, _ = _objective.model_variables(model)
    train_values, other_values = _objective.read_model_values(model)
    dtypes = [v.dtype for v in train_values]
    shapes = [tuple(v.shape) for v in trainable]
    splits = np.cumsum([int(np.prod(s)) for s in shapes])

    # The normalizer does not depend on the weights: one forward pass.
    normalizer = 0.0
    for x, y, sw in batches:
        value = batch_normalizer(train_values, other_values, x, y, sw)
        normalizer += float(ops.convert_to_numpy(value))
    _objective.check_normalizer(normalizer)

    def unflatten(q):
        parts = np.split(q, splits[:-1])
        return [p.reshape(s) for p, s in zip(parts, shapes)]

    def product(q):
        """`H q` for a flat float64 `q`, as a flat float64 vector."""
        tensors = [ops.convert_to_tensor(p, dtype=d) for p, d in zip(unflatten(q), dtypes)]
        sums = [np.zeros(s, dtype="float64") for s in shapes]
        for x, y, sw in batches:
            accumulate(sums, hvp(train_values, other_values, tensors, x, y, sw))
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
