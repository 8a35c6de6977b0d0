"""MSAMModel: Momentum-SAM, SAM's flatness at one gradient per step.

Momentum-SAM (Becker, Altrock, Risse 2024, arXiv 2401.12033) needs no ascent
gradient: the optimizer's momentum `v` already points along the recent
gradients, so the step's ONE gradient is taken at `w - rho * v / ||v||`
(`keras_sam.rules.msam_perturbation`) and applied at `w` as the optimizer
would apply a plain gradient.
"""

import keras

from keras_sam import _validation
from keras_sam import rules
from keras_sam._keras_compat import optimizers as optimizer_internals
from keras_sam.models.method import OneGradientModel

MOMENTUM_OPTIMIZERS = ("SGD(momentum > 0)", "Adam", "AdamW", "Adamax", "Nadam")
"""Optimizers whose first-moment buffer `MSAMModel` can perturb along."""


def first_moment_sign(optimizer):
    """`(inner optimizer, sign)`: `sign * buffer` points along the gradient.

    Keras' SGD keeps `m = momentum * m - lr * g` (a descent direction, sign
    -1); Adam, AdamW, Adamax and Nadam keep `m = beta_1 * m + (1 - beta_1) g`
    (sign +1). A LossScaleOptimizer is looked through.

    Raises:
        ValueError: for SGD with `momentum=0` (it keeps no buffer) or an
            optimizer not in `MOMENTUM_OPTIMIZERS`.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    optimizers = keras.optimizers
    if isinstance(inner, optimizers.SGD):
        if not inner.momentum:
            raise ValueError(
                "MSAMModel perturbs along the optimizer's momentum, and "
                f"SGD(momentum={inner.momentum}) keeps none: pass an SGD with "
                "`momentum` > 0 (e.g. keras.optimizers.SGD(0.1, momentum=0.9)) "
                "or Adam / AdamW."
            )
        return inner, -1.0
    if isinstance(inner, (optimizers.Adam, optimizers.Adamax, optimizers.Nadam)):
        return inner, 1.0  # AdamW is an Adam
    raise ValueError(
        f"MSAMModel perturbs along the optimizer's first moment; "
        f"{type(inner).__name__} is not supported. Use one of "
        f"{', '.join(MOMENTUM_OPTIMIZERS)}."
    )


@keras.saving.register_keras_serializable(package="keras_sam")
class MSAMModel(OneGradientModel):
    """Wraps a Keras model so that `fit` trains it with Momentum-SAM.

    Each step evaluates ONE gradient, at the point one normalized step of
    length `rho` down the optimizer's momentum,
    `g = grad f_B(w - rho * v / ||v||)`, and hands `g` to the compiled
    optimizer, which applies it at `w` (updating its momentum with it). `v`
    is the momentum before this step's update, in PyTorch's convention
    `v <- mu v + g` (Keras' SGD keeps `-lr v`, the same direction at a
    constant rate); `||.||` is one global norm. At the first step `v = 0`,
    so the gradient is taken at `w`. This is the update of the paper's code,
    written at the unperturbed weights: the model's variables always hold
    `w`, so `evaluate`, `predict`, `save` and `export` see the weights the
    paper evaluates, with nothing to undo after training.

    Optimizers: SGD with `momentum > 0` (plain or Nesterov) perturbs along
    Keras' velocity; Adam, AdamW, Adamax and Nadam along their first moment
    `m` (the paper's AdamW-MSAM). SGD with `momentum=0`, or another
    optimizer, is a `ValueError` when `fit` starts, before any step.

    The paper's weight decay for SGD is an L2 term at the perturbed point:
    here kernel regularizers are (they are part of the loss, evaluated at
    `w - rho v/||v||`); an optimizer's own `weight_decay` acts on `w`, as
    AdamW-MSAM's decoupled decay does.

    What is logged: `loss` and the metrics of the one pass, at the perturbed
    point (Momentum-SAM computes no loss at `w`), `grad_norm` (its gradient,
    of the replica's own batch) and `rho`. BatchNorm moving statistics move
    once per step, from that pass (the paper's code then recomputes them at
    `w` after training; pass the training data once through the model in
    training mode to do the same). Under `MirroredStrategy` and JAX
    `DataParallel` every replica holds the same momentum, so the
    perturbation is the same on all of them. `rho=0` is plain training with
    the compiled optimizer, exactly.

    Args:
        model: the `keras.Model` to train, built.
        rho: the length of the step along the momentum, `>= 0`. The paper
            uses larger values than SAM's: 0.3 (its code's default) to 3
            (CIFAR-100 and ImageNet with SGD), 1 to 10 with AdamW.
        **kwargs: passed to `keras.Model` (e.g. `name`).

    Example:

    ```python
    model = keras_sam.MSAMModel(inner, rho=0.3)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=...)
    model.fit(x, y, epochs=10)   # one gradient per step, like plain SGD
    ```
    """

    def __init__(self, model, rho=0.3, **kwargs):
        self.rho = _validation.real("rho", rho, low=0)
        super().__init__(model, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(rho=self.rho)
        return config

    def _before_fit(self, bound):
        if self.optimizer is not None:
            first_moment_sign(self.optimizer)  # a clear error now

    def perturbation(self, weights, non_trainable, rho):
        """One normalized step of length `rho` down the momentum."""
        if not self.optimizer.built:  # as `apply` would, on its first call
            self.optimizer.build(self.trainable_variables)
        optimizer, sign = first_moment_sign(self.optimizer)
        variables = self.trainable_variables
        moments = optimizer_internals.momentum_buffers(optimizer, variables, adam=sign > 0)
        return rules.msam_perturbation([sign * m.value for m in moments], rho), None
