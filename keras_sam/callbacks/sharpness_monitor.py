"""A callback that logs sharpness measures during `fit`."""

import keras
import numpy as np

from keras_sam import _validation
from keras_sam import sharpness

__all__ = ["SharpnessMonitor"]


class SharpnessMonitor(keras.callbacks.Callback):
    """Measures sharpness at the end of every `every`-th epoch of `fit`.

    At the end of epochs `every - 1, 2 * every - 1, ...` (0-based: epochs
    `every, 2 * every, ...` counting from 1) it computes the requested
    measures of `keras_sam.sharpness` on `data` at the model's current
    weights (each looked up by name with `keras_sam.sharpness.get_measure`
    and called as `fn(model, batches, loss, **settings)`, `settings` being
    this callback's arguments named in
    `keras_sam.sharpness.MEASURE_SETTINGS`) and writes them into the
    epoch's `logs` under the keys
    `prefix + name`, e.g. `"worst_case_sharpness"`, `"full_gradient_norm"`,
    `"hessian_max_eigenvalue"`. Callbacks after it in the `callbacks` list
    and the ones `fit` adds (`History`, the progress bar) see them, so put it
    BEFORE `CSVLogger` / `TensorBoard` in the list.

    Epochs that are not measured get no key (with the default
    `fill_value=None`): `History.history[key]` then holds one entry per
    measured epoch only, and `CSVLogger`, which fixes its columns at the
    first epoch, drops the keys unless epoch 1 is measured. Pass
    `fill_value=float("nan")` to write a placeholder on the other epochs
    instead. The values of every measured epoch are also kept in
    `self.results` (`{epoch: {key: value}}`).

    The measures leave the model's weights and every other variable (BatchNorm
    statistics, optimizer, seed generators) untouched, and work for models
    built under `tf.distribute.MirroredStrategy`. Measuring a `SAMModel`
    wrapper is the same as measuring its inner model, whose call it
    delegates to. The compiled functions are cached per model, so only the
    first measurement traces them.

    Args:
        data: The data to measure on: a `tf.data.Dataset`, a re-iterable of
            `(x, y[, sample_weight])` batches (e.g. a list; not a one-shot
            generator), or a tuple of arrays `(x, y[, sample_weight])` split
            into batches of `batch_size`. The paper measures on the first
            1024 training examples in batches of 128.
        loss: The loss to measure (a `keras.losses.Loss`, name or
            `callable(y_true, y_pred)`). Defaults to the model's compiled
            loss (`model.loss`, or `model.inner.loss` for a wrapper), which
            must then be a single loss.
        every: Measure every `every` epochs, `>= 1`. Defaults to 1.
        rho: Radius of the worst-case ball, `>= 0`. Defaults to `2e-4`.
        adaptive: Adaptive (`|delta_j| <= rho * |w_j|`) worst-case ball.
        iterations: Auto-PGD iterations per batch for the worst-case
            sharpness, `>= 1`. Defaults to 20.
        measures: Names (a string or a sequence of strings) of registered
            measures (`keras_sam.sharpness.measure_names()`): the built-in
            `"worst_case_sharpness"`, `"full_gradient_norm"` and
            `"hessian_max_eigenvalue"`, and any added with
            `keras_sam.sharpness.register_measure` before this callback is
            made. Defaults to the first two.
        hessian_iterations: Most Lanczos steps (Hessian-vector products) for
            `"hessian_max_eigenvalue"`, `>= 1`. Defaults to 20.
        hessian_tol: Relative residual `||Hv - lambda v|| / |lambda|` at
            which Lanczos stops. Defaults to `1e-5`.
        seed: Seed of the Lanczos start vector. Defaults to 0.
        batch_size: Batch size when `data` is a tuple of arrays. Defaults to
            128.
        steps: Optional maximum number of batches of `data` to use.
        include_model_losses: Whether the measured loss includes
            `sum(model.losses)` (regularizers). Defaults to `False`.
        prefix: A string put before every key. Defaults to `""`.
        fill_value: If not `None`, written under every key on the epochs that
            are not measured. Defaults to `None` (no key).

    Example:

    ```python
    monitor = keras_sam.callbacks.SharpnessMonitor(
        (x_train[:1024], y_train[:1024]), every=5,
        measures=("worst_case_sharpness", "full_gradient_norm"))
    history = model.fit(x_train, y_train, epochs=20,
                        callbacks=[monitor, keras.callbacks.CSVLogger("log.csv")])
    history.history["worst_case_sharpness"]  # epochs 5, 10, 15, 20
    ```
    """

    def __init__(
        self,
        data,
        loss=None,
        every=1,
        rho=2e-4,
        adaptive=False,
        iterations=20,
        measures=("worst_case_sharpness", "full_gradient_norm"),
        hessian_iterations=20,
        hessian_tol=1e-5,
        seed=0,
        batch_size=128,
        steps=None,
        include_model_losses=False,
        prefix="",
        fill_value=None,
    ):
        super().__init__()
        if data is None or (not isinstance(data, (tuple, list)) and _is_one_shot(data)):
            # A one-shot iterator would be exhausted after one epoch.
            raise _validation.error(
                "data",
                "re-iterable data to measure on (a tf.data.Dataset, a list of "
                "batches or a tuple of arrays), not a one-shot iterator",
                data,
            )
        self._batches = sharpness.Batches(data, batch_size=batch_size, steps=steps)
        if loss is not None:
            sharpness.check_loss(loss)  # Validates it now.
        self.data = data
        self.loss = loss
        self.every = _validation.integer("every", every, low=1)
        self.rho = _validation.real("rho", rho, low=0)
        if not isinstance(adaptive, (bool, int, np.bool_, np.integer)):
            raise _validation.error("adaptive", "a bool", adaptive)
        self.adaptive = bool(adaptive)
        self.iterations = _validation.integer("iterations", iterations, low=1)
        self.measures = _check_measures(measures)
        self.hessian_iterations = _validation.integer(
            "hessian_iterations", hessian_iterations, low=1
        )
        self.hessian_tol = _validation.real("hessian_tol", hessian_tol, low=0)
        self.seed = _validation.integer("seed", seed, low=0, allow_none=True)
        self.batch_size = _validation.integer("batch_size", batch_size, low=1, allow_none=True)
        self.steps = _validation.integer("steps", steps, low=1, allow_none=True)
        self.include_model_losses = bool(include_model_losses)
        if not isinstance(prefix, str):
            raise _validation.error("prefix", "a string", prefix)
        self.prefix = str(prefix)
        # A NumPy scalar as a Python one, for the logs and get_config().
        if isinstance(fill_value, (np.generic, np.ndarray)) and not np.ndim(fill_value):
            fill_value = fill_value.item()
        self.fill_value = fill_value
        self.results = {}

    def get_config(self):
        """The constructor arguments except `data` and `loss`."""
        return {
            "every": self.every,
            "rho": self.rho,
            "adaptive": self.adaptive,
            "iterations": self.iterations,
            "measures": self.measures,
            "hessian_iterations": self.hessian_iterations,
            "hessian_tol": self.hessian_tol,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "steps": self.steps,
            "include_model_losses": self.include_model_losses,
            "prefix": self.prefix,
            "fill_value": self.fill_value,
        }

    def should_measure(self, epoch):
        """Whether the end of (0-based) `epoch` is measured."""
        return (epoch + 1) % self.every == 0

    def measure(self, model=None):
        """Computes the measures now; returns `{key: float}`.

        Args:
            model: The model to measure. Defaults to the callback's model.
        """
        model = self.model if model is None else model
        loss = self._resolve_loss(model)
        settings = {name: getattr(self, name) for name in sharpness.MEASURE_SETTINGS}
        out = {}
        for name in self.measures:
            measure = sharpness.get_measure(name)
            value = measure(model, self._batches, loss, **settings)
            out[self.prefix + name] = float(value)
        return out

    def on_epoch_end(self, epoch, logs=None):
        if not self.should_measure(epoch):
            if self.fill_value is not None and logs is not None:
                for name in self.measures:
                    logs[self.prefix + name] = self.fill_value
            return
        values = self.measure()
        self.results[epoch] = dict(values)
        if logs is not None:
            logs.update(values)

    def _resolve_loss(self, model):
        if self.loss is not None:
            return self.loss
        loss = getattr(model, "loss", None)
        if loss is None and hasattr(model, "inner"):
            loss = getattr(model.inner, "loss", None)
        if isinstance(loss, (list, tuple)) and len(loss) == 1:
            loss = loss[0]
        if isinstance(loss, dict) and len(loss) == 1 and "class_name" not in loss:
            loss = next(iter(loss.values()))
        if loss is None:
            raise ValueError(
                "SharpnessMonitor: `loss` was not given and the model has no "
                "compiled loss; pass `loss=`."
            )
        if isinstance(loss, (list, tuple)) or (isinstance(loss, dict) and "class_name" not in loss):
            raise ValueError(
                "SharpnessMonitor: the model's compiled loss has several "
                "parts; pass a single `loss=` (a callable may take the whole "
                "output structure)."
            )
        return loss


def _is_one_shot(data):
    if hasattr(data, "cardinality"):
        return False
    try:
        return iter(data) is data
    except TypeError:
        return False


def _check_measures(measures):
    registered = sharpness.measure_names()
    expected = f"a string or a sequence of distinct strings among {registered}"
    if isinstance(measures, str):
        measures = (measures,)
    try:
        names = tuple(measures)
    except TypeError:
        raise _validation.error("measures", expected, measures) from None
    names = tuple(_validation.one_of("measures", name, registered) for name in names)
    if not names or len(set(names)) != len(names):
        raise _validation.error("measures", expected, measures)
    return names
