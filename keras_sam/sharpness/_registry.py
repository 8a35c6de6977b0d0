"""The registry of measures: a name -> a function with one calling convention.

`keras_sam.callbacks.SharpnessMonitor` looks every measure up here by name, so
a measure registered with `register_measure` can be logged like the built-in
ones.

The calling convention of a measure is in the docstring of `register_measure`.
"""

from keras_sam import _validation
from keras_sam.sharpness.curvature import hessian_max_eigenvalue
from keras_sam.sharpness.gradient_norm import full_gradient_norm
from keras_sam.sharpness.worst_case import worst_case_sharpness

__all__ = [
    "MEASURES",
    "MEASURE_SETTINGS",
    "register_measure",
    "unregister_measure",
    "get_measure",
    "measure_names",
]

MEASURES = (
    "worst_case_sharpness",
    "full_gradient_norm",
    "hessian_max_eigenvalue",
)
"""The built-in measures' names (always registered, in this order)."""

MEASURE_SETTINGS = (
    "rho",
    "adaptive",
    "iterations",
    "hessian_iterations",
    "hessian_tol",
    "seed",
    "include_model_losses",
)
"""The keyword arguments `SharpnessMonitor` passes to every measure."""


def _worst_case_measure(
    model,
    data,
    loss,
    *,
    rho=2e-4,
    adaptive=False,
    iterations=20,
    include_model_losses=False,
    **settings,
):
    """`worst_case_sharpness` with `rho`, `adaptive` and `iterations`."""
    del settings
    return worst_case_sharpness(
        model,
        data,
        loss,
        rho=rho,
        adaptive=adaptive,
        iterations=iterations,
        include_model_losses=include_model_losses,
    )


def _gradient_norm_measure(model, data, loss, *, include_model_losses=False, **settings):
    """`full_gradient_norm`."""
    del settings
    return full_gradient_norm(model, data, loss, include_model_losses=include_model_losses)


def _hessian_measure(
    model,
    data,
    loss,
    *,
    hessian_iterations=20,
    hessian_tol=1e-5,
    seed=0,
    include_model_losses=False,
    **settings,
):
    """`hessian_max_eigenvalue` with `iterations=hessian_iterations`,
    `tol=hessian_tol` and `seed`."""
    del settings
    return hessian_max_eigenvalue(
        model,
        data,
        loss,
        iterations=hessian_iterations,
        tol=hessian_tol,
        seed=seed,
        include_model_losses=include_model_losses,
    )


_BUILTIN = dict(zip(MEASURES, (_worst_case_measure, _gradient_norm_measure, _hessian_measure)))
_REGISTRY = dict(_BUILTIN)


def measure_names():
    """The names of all registered measures, a tuple.

    The built-in ones (`MEASURES`) first, then the registered ones in the
    order they were registered.
    """
    return tuple(_REGISTRY)


def get_measure(name):
    """The function registered under `name`.

    Args:
        name: A registered measure's name (see `measure_names()`).

    Returns:
        `fn(model, data, loss, **settings) -> float` (see the calling
        convention in the docstring of `register_measure`).

    Raises:
        ValueError: `name` is not registered.
    """
    return _REGISTRY[_validation.one_of("name", name, measure_names())]


def register_measure(name, fn):
    """Registers `fn` as the measure `name`.

    After this, `SharpnessMonitor(data, measures=(..., name))` computes
    `fn(model, data, loss, **settings)` and logs it under `prefix + name`.

    Calling convention of a measure:

        fn(model, data, loss, **settings) -> float

    - `model`: the built `keras.Model` to measure (its variables must only be
      read).
    - `data`: a `keras_sam.sharpness.Batches` (from `SharpnessMonitor`: already
      batched and capped at its `steps`), a re-iterable of
      `(x, y, sample_weight)` batches of backend tensors, `sample_weight` `None`
      when absent. The built-in measures also accept anything their functions
      accept (a dataset, an iterable of batches, a tuple of arrays).
    - `loss`: a `keras.losses.Loss`, loss name or `callable(y_true, y_pred)`.
    - `settings`: keyword arguments, the `SharpnessMonitor` settings named in
      `MEASURE_SETTINGS`: `rho`, `adaptive`, `iterations` (worst-case sharpness),
      `hessian_iterations`, `hessian_tol`, `seed` (Hessian eigenvalue) and
      `include_model_losses`. `SharpnessMonitor` passes all of them to every
      measure, so a measure takes the ones it uses and `**settings` for the rest.

    The value returned is logged as `float(value)`.

    Args:
        name: A non-empty string not registered yet (to replace a measure of
            your own, `unregister_measure` it first; the built-in ones cannot
            be replaced).
        fn: A callable `fn(model, data, loss, **settings) -> float`, as
            above.

    Returns:
        `fn`.

    Raises:
        ValueError: a bad `name` or `fn`, or `name` already registered.

    Example:

    ```python
    def weight_norm(model, data, loss, **settings):
        # The L2 norm of the trainable weights (data and loss unused).
        return math.sqrt(sum(
            float(np.sum(np.square(keras.ops.convert_to_numpy(v))))
            for v in model.trainable_variables))

    keras_sam.sharpness.register_measure("weight_norm", weight_norm)
    monitor = keras_sam.callbacks.SharpnessMonitor(
        (x[:1024], y[:1024]), measures=("full_gradient_norm", "weight_norm"))
    ```
    """
    if not isinstance(name, str) or not name:
        raise _validation.error("name", "a non-empty string", name)
    if name in _REGISTRY:
        raise _validation.error(
            "name",
            "a measure name not registered yet (unregister_measure() it "
            f"first; registered: {measure_names()!r})",
            name,
        )
    if not callable(fn):
        raise _validation.error("fn", "a callable fn(model, data, loss, **settings)", fn)
    _REGISTRY[name] = fn
    return fn


def unregister_measure(name):
    """Removes a measure registered with `register_measure`.

    Args:
        name: A registered name other than the built-in ones (`MEASURES`).

    Returns:
        The function that was registered.

    Raises:
        ValueError: `name` is built in or not registered.
    """
    user = tuple(n for n in _REGISTRY if n not in _BUILTIN)
    if isinstance(name, str) and name in _BUILTIN:
        raise _validation.error(
            "name",
            f"a measure registered by the user, one of {user!r} (the "
            "built-in ones cannot be removed)",
            name,
        )
    return _REGISTRY.pop(_validation.one_of("name", name, user))
