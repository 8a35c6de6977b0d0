"""Replicas, devices and loss scaling: how a step's gradients meet across
`tf.distribute` replicas and JAX devices, and how the optimizer applies them
under a `LossScaleOptimizer`."""

import keras
from keras import ops

from keras_sam import backend as sam_backend
from keras_sam import rules


def loss_scale(optimizer):
    """The dynamic loss scale of a `LossScaleOptimizer` (a float32 tensor), else 1."""
    scale = getattr(optimizer, "dynamic_scale", None)
    return 1.0 if scale is None else ops.cast(scale, "float32")


def apply(optimizer, descent, variables):
    """`optimizer.apply(descent, variables)`; returns whether the step was
    taken (a boolean tensor under a LossScaleOptimizer, else None)."""
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer.apply(descent, variables)
        return None
    if sam_backend.num_replicas() > 1:
        # Keras' LossScaleOptimizer checks only the first replica's
        # gradients for inf/NaN; make every replica see all of them.
        # apply() sums across replicas, so the update is unchanged.
        descent = sam_backend.all_reduce(descent, "mean")
    optimizer.apply(descent, variables)
    return rules.all_finite(descent)


def per_replica_batches(model, sync_perturbation):
    """Replicas that each take their own slice of the global batch (and
    split it into sub-batches of their own)."""
    strategy = getattr(model, "distribute_strategy", None)  # TF only
    if strategy is not None:
        return getattr(strategy, "num_replicas_in_sync", 1)
    if not sync_perturbation and hasattr(sam_backend, "per_device_count"):
        return sam_backend.per_device_count()  # JAX DataParallel
    return 1


def check_per_replica_perturbation(name):
    """Per-replica perturbation needs a step per device: refused (before any
    step) under a JAX `ModelParallel` mesh whose batch axis spans several
    devices, where the step runs on global arrays."""
    count = getattr(sam_backend, "batch_devices_without_per_device_step", lambda: 1)()
    if count > 1:
        raise ValueError(
            f"{name} perturbs per replica by default (each "
            "device with the gradient of its own batch shard), which needs "
            "one step per device: keras.distribution.DataParallel gives it, "
            f"but this distribution ({type(keras.distribution.distribution()).__name__}) "
            f"splits the batch over {count} devices of a mesh that also shards "
            "the weights. Pass `sync_perturbation=True` (one perturbation from "
            "the global batch's gradient, the same on every device), with "
            "`num_batch_splits` too for m-sharpness within the global batch."
        )


def per_device_step(step, optimizer, mesh_and_axis, state, data, is_float):
    """`step(trainable, non_trainable, metrics, x, y, sample_weight)` on every
    device's shard of the batch (JAX under `DataParallel`): each device
    perturbs with its own gradient, and the descent gradients, state and
    metrics are combined across devices as MirroredStrategy combines
    replicas. Returns `(descent, new_state, new_metrics, stats, y_pred)`."""

    def local(state, data):
        trainable, non_trainable, optimizer_vars, metrics_vars = state
        mapping = list(zip(optimizer.variables, optimizer_vars))
        with keras.StatelessScope(state_mapping=mapping):
            descent, new_state, new_metrics, stats, y_pred = step(
                trainable, non_trainable, metrics_vars, *data
            )
        reduce = sam_backend.all_reduce
        descent = reduce(descent, "sum")  # each device's loss is 1/devices
        new_state = [reduce([n], "mean")[0] if f else n for n, f in zip(new_state, is_float)]
        deltas = reduce([n - m for n, m in zip(new_metrics, metrics_vars)], "sum")
        new_metrics = [m + d for m, d in zip(metrics_vars, deltas)]
        # The loss is each device's share of the global mean; the other
        # statistics are the devices' average.
        stats = {k: reduce([v], "sum" if k == "loss" else "mean")[0] for k, v in stats.items()}
        return (descent, new_state, new_metrics, stats), y_pred

    mesh, axis = mesh_and_axis
    (descent, new_state, new_metrics, stats), y_pred = sam_backend.per_device(
        local, mesh, axis, state, data
    )
    return descent, new_state, new_metrics, stats, y_pred


class ReplicaSums:
    """A step's gradients summed over the replicas, each all-reduced at most
    once per step, those not reduced yet in one collective.

    Args:
        local: `{name: this replica's gradients}`; more may be added.
        reduced: `{name: summed gradients}` already known.
    """

    def __init__(self, local, reduced=None):
        self.local = local
        self.reduced = dict(reduced or {})

    def __call__(self, *names):
        """The summed gradients of `names`, one list per name."""
        missing = [n for n in names if n not in self.reduced]
        if missing:
            flat = sam_backend.all_reduce([g for n in missing for g in self.local[n]], "sum")
            for n in missing:
                self.reduced[n], flat = flat[: len(self.local[n])], flat[len(self.local[n]) :]
        return [self.reduced[n] for n in names]
