"""Keras' `train_step` on each backend, around a method's step on one batch.

TensorFlow and PyTorch update variables in place (`stateful`); JAX passes
state in and out (`stateless`, see Keras' JAX trainer). Both take what the
method does as values (`StepParts`), so this module knows nothing of SAM.
"""

import collections

import keras
from keras import ops

from keras_sam import backend as sam_backend
from keras_sam import rules
from keras_sam._keras_compat import fit_loop
from keras_sam.models import _replicas

TRAINING_STATISTICS = ("sharpness", "grad_norm", "rho", "sam_fraction", "kl", "noise_scale")
"""Logged by the training step only; `evaluate` and validation omit them."""

StepParts = collections.namedtuple(
    "StepParts", ["on_batch", "after_step", "after_apply", "keras_step", "mesh", "track"]
)
"""What a method's training step is made of:

- `on_batch(weights, state, metrics, x, y, sample_weight)` -> `(descent,
  new_state, new_metrics, stats, y_pred)`: the gradients to apply and the
  new values of the non-trainable and metric variables, for one replica;
- `after_step(state, new_state, stats)` -> `(new_state, logs)`: after the
  replicas' results are combined (the noise scale's averages);
- `after_apply(trainable, state)` -> `state`: after the optimizer moved the
  weights to `trainable` (MESA's moving average);
- `keras_step`: True when this step is Keras' own `train_step`;
- `mesh`: `(mesh, axis)` for a step per JAX device, or None;
- `track(x, stats)`: updates the logged training statistics.
"""


def stateful(model, parts, data, keras_train_step):
    """`train_step` for TensorFlow and PyTorch: variables updated in place."""
    if parts.keras_step:
        return keras_train_step(data)
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    trainable = model.trainable_variables
    non_trainable = model.non_trainable_variables
    state = sam_backend.read_values(non_trainable)
    descent, new_state, new_metrics, stats, y_pred = parts.on_batch(
        sam_backend.read_values(trainable),
        state,
        sam_backend.read_values(model.metrics_variables),
        x,
        y,
        sample_weight,
    )
    new_state, extra_logs = parts.after_step(state, new_state, stats)
    with sam_backend.no_grad():
        finite = _replicas.apply(model.optimizer, descent, trainable)
        new_state = parts.after_apply(sam_backend.read_values(trainable), new_state)
        if finite is not None:  # a skipped step changes no state
            new_state = [ops.where(finite, n, o) for n, o in zip(new_state, state)]
        for v, value in zip(non_trainable, new_state):
            v.assign(value)
        for v, value in zip(model.metrics_variables, new_metrics):
            v.assign(value)
    parts.track(x, stats)
    logs = model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
    logs.update(extra_logs)
    return logs


def stateless(model, parts, state, data, keras_train_step):
    """`train_step` for JAX: state in, state out."""
    if parts.keras_step:
        return keras_train_step(state, data)
    trainable, non_trainable, optimizer_vars, metrics_vars = state
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if parts.mesh is None:
        mapping = list(zip(model.optimizer.variables, optimizer_vars))
        with keras.StatelessScope(state_mapping=mapping):
            descent, new_state, metrics_vars, stats, y_pred = parts.on_batch(
                trainable, non_trainable, metrics_vars, x, y, sample_weight
            )
    else:
        is_float = [keras.backend.is_float_dtype(v.dtype) for v in model.non_trainable_variables]
        descent, new_state, metrics_vars, stats, y_pred = _replicas.per_device_step(
            parts.on_batch, model.optimizer, parts.mesh, state, (x, y, sample_weight), is_float
        )
    new_state, extra_logs = parts.after_step(non_trainable, new_state, stats)
    new_trainable, optimizer_vars = model.optimizer.stateless_apply(
        optimizer_vars, descent, trainable
    )
    new_state = parts.after_apply(new_trainable, new_state)
    if isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
        finite = rules.all_finite(descent)  # a skipped step changes no state
        new_state = [ops.where(finite, n, o) for n, o in zip(new_state, non_trainable)]
    mapping = list(zip(model.metrics_variables, metrics_vars))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        parts.track(x, stats)
        logs = model.compute_metrics(x, y, y_pred, sample_weight)
    logs.update(extra_logs)
    metrics_vars = [scope.get_current_value(v) for v in model.metrics_variables]
    return logs, (new_trainable, new_state, optimizer_vars, metrics_vars)


def keras_step_without_grad_norm(model, grad_norm_tracker, keras_train_step):
    """Keras' own `train_step` (the plain steps before `sam_start_epoch`),
    with `grad_norm` logged as NaN: it is not measured there."""
    if keras.backend.backend() != "jax":

        def step(data):
            grad_norm_tracker.update_state(float("nan"))
            return keras_train_step(data)

        return step

    def stateless_step(state, data):
        logs, state = keras_train_step(state, data)
        *others, metrics_vars = state
        mapping = list(zip(model.metrics_variables, metrics_vars))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            grad_norm_tracker.update_state(float("nan"))
            logs = dict(logs, grad_norm=grad_norm_tracker.result())
        metrics_vars = [scope.get_current_value(v) for v in model.metrics_variables]
        return logs, (*others, metrics_vars)

    return stateless_step


def without_training_statistics(logs):
    return {k: v for k, v in logs.items() if k not in TRAINING_STATISTICS}


class Trackers:
    """The `Mean`s behind the logged training statistics: `grad_norm` always,
    the others where the method logs them (`sharpness`, `rho` and
    `sam_fraction` average the SAM steps only; `kl` is MESA's)."""

    def __init__(self, logged, switches):
        def mean(name, wanted=True):
            return keras.metrics.Mean(name=name) if wanted else None

        self.sharpness = mean("sharpness", "sharpness" in logged)
        self.grad_norm = mean("grad_norm")
        self.rho = mean("rho", "rho" in logged)
        self.sam_fraction = mean("sam_fraction", switches)
        self.kl = mean("kl", "kl" in logged)

    def named(self):
        """`(name, Mean)` of the trackers that exist, in the order Keras logs
        them (the model sets each as an attribute, so Keras tracks it)."""
        order = ("sharpness", "grad_norm", "rho", "sam_fraction", "kl")
        return [(n, getattr(self, n)) for n in order if getattr(self, n) is not None]

    def track(self, model, x, stats):
        """Updates the loss tracker and the statistics from a step's `stats`."""
        replicas = sam_backend.num_replicas()
        size = ops.shape(next(t for t in keras.tree.flatten(x) if t is not None))[0]
        fit_loop.loss_tracker(model).update_state(stats["loss"] * replicas, sample_weight=size)
        if self.sharpness is not None:
            self.sharpness.update_state(stats["sharpness"], sample_weight=stats["sam_step"])
        if self.rho is not None:
            self.rho.update_state(stats["rho"], sample_weight=stats["sam_step"])
        self.grad_norm.update_state(stats["grad_norm"])
        if self.sam_fraction is not None:
            self.sam_fraction.update_state(stats["sam_step"])
        if self.kl is not None:  # 0 where the term is off (kl_weight=0)
            self.kl.update_state(stats.get("kl", ops.zeros((), "float32")))
