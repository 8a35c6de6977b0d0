"""Optimizer internals: the learning rate as given, a MultiOptimizer's
default optimizer, momentum buffers (tested on Keras 3.12 and 3.15)."""

import keras


def rate_optimizer(optimizer):
    """The optimizer whose learning rate stands for `optimizer`'s (GSAM's
    radius follows it): a LossScaleOptimizer's inner optimizer, and a
    `keras.optimizers.MultiOptimizer`'s (Keras 3.15+) default optimizer,
    the one of every variable its `OptimizerMap` does not map elsewhere.

    Raises:
        ValueError: for a MultiOptimizer built from a callable (it has no
            default optimizer).
    """
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if not is_multi_optimizer(optimizer):
        return optimizer
    default = getattr(optimizer._optimizer_map, "default_optimizer", None)
    if default is None:
        raise ValueError(
            "This MultiOptimizer was built from a callable, so it has no default "
            "optimizer whose learning rate keras_sam could follow. Build it from "
            "`keras.optimizers.OptimizerMap(default_optimizer, {pattern: optimizer})`: "
            "keras_sam reads the default optimizer's rate."
        )
    return default


def is_multi_optimizer(optimizer):
    """Whether `optimizer` is a `keras.optimizers.MultiOptimizer` (Keras 3.15+)."""
    multi = getattr(keras.optimizers, "MultiOptimizer", None)
    return multi is not None and isinstance(optimizer, multi)


def sub_optimizers(optimizer):
    """The optimizers that apply updates: a MultiOptimizer's (public
    `optimizers`), or the optimizer itself (a LossScaleOptimizer's inner one)."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if is_multi_optimizer(optimizer):
        return list(optimizer.optimizers)
    return [optimizer]


def learning_rate_schedule(optimizer):
    """The learning rate as given to `rate_optimizer(optimizer)`: a float,
    variable or schedule."""
    return rate_optimizer(optimizer)._learning_rate


def momentum_buffers(optimizer, variables, adam):
    """The first-moment buffer of each of `variables` in `optimizer` (built,
    as inside `fit`): SGD's public `momentums`, or (`adam=True`) Adam's
    private `_momentums` (Adam, AdamW, Adamax, Nadam), both indexed by the
    private `_get_variable_index`."""
    buffers = optimizer._momentums if adam else optimizer.momentums
    return [buffers[optimizer._get_variable_index(v)] for v in variables]


def learning_rate_schedules(optimizer):
    """The learning rates as given to the optimizers that apply updates
    (`sub_optimizers`): floats, variables or schedules, one per optimizer."""
    return [getattr(o, "_learning_rate", None) for o in sub_optimizers(optimizer)]
