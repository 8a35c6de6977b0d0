"""GSAMModel: SAM's two gradients combined as `g_p - alpha * g_perp`
(`keras_sam.rules.gsam_descent`), with the radius tied to the learning rate
the optimizer actually uses (`keras_sam.rules.gsam_rho`)."""

import keras
from keras import ops

from keras_sam import _validation
from keras_sam import rules
from keras_sam._keras_compat import optimizers as optimizer_internals
from keras_sam.models.sam import SAMModel


@keras.saving.register_keras_serializable(package="keras_sam")
class GSAMModel(SAMModel):
    """Wraps a Keras model so that `fit` trains it with GSAM.

    GSAM (Zhuang et al., ICLR 2022) takes SAM's two gradients and descends
    along `d = g_p - alpha * g_perp`, where `g_perp` is the part of the clean
    gradient orthogonal to the perturbed gradient (see
    `keras_sam.rules.gsam_descent`). `alpha=0` is SAM exactly.

    The radius follows the rate the optimizer ACTUALLY uses at each step,
    also when a callback (`LearningRateScheduler`, `ReduceLROnPlateau`)
    changes it: `rho_t = rho_min + (rho - rho_min) (lr_t - lr_min) /
    (lr_max - lr_min)`, clipped to `[rho_min, rho]`. It is constant (`rho`)
    when `rho_min` is None. The range `(lr_max, lr_min)`:

    - passed `lr_max` and `lr_min`: those;
    - a learning-rate schedule: its range (keras_sam schedules, Keras'
      CosineDecay, ExponentialDecay, PolynomialDecay; other schedules need
      `lr_max` and `lr_min`);
    - a plain float rate: `lr_max` is the optimizer's rate when `fit` starts
      and `lr_min` is 0 (or the `lr_min` passed), so `rho_t` shrinks in
      proportion as callbacks lower the rate. Pass `lr_max` to fix the range
      across several `fit` calls (for instance when resuming).

    The range is read when `fit` starts, before the first step; a range that
    cannot be told is a `ValueError` there.

    Under a `keras.optimizers.MultiOptimizer` (a rate for the backbone,
    another for the head), the radius follows the rate of its
    `OptimizerMap`'s default optimizer, the one of every variable the map
    does not send elsewhere; the range above is that optimizer's. A
    MultiOptimizer built from a callable has no default optimizer and is
    refused when `fit` starts.

    Args:
        model: the `keras.Model` to train, built.
        rho: the radius at the largest learning rate (GSAM's rho_max).
        alpha: weight of the orthogonal correction, `>= 0`.
        rho_min: the radius at the smallest learning rate, in `[0, rho]`;
            None keeps `rho` constant.
        lr_max, lr_min: learning-rate range (see above).
        **kwargs: the keywords of `SAMModel` (`adaptive`, `eta`,
            `sync_perturbation`, `num_batch_splits`, `sam_every`,
            `sam_start_epoch`, ...).

    Example:

    ```python
    lr = keras_sam.schedules.CosineAnnealing(0.1, 0.001, epochs=200,
                                             steps_per_epoch=390)
    model = keras_sam.GSAMModel(inner, rho=0.05, alpha=0.02, rho_min=0.005)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=...)
    ```
    """

    def __init__(
        self,
        model,
        rho=0.05,
        alpha=0.02,
        rho_min=None,
        lr_max=None,
        lr_min=None,
        **kwargs,
    ):
        super().__init__(model, rho=rho, **kwargs)
        self.alpha = _validation.real("alpha", alpha, low=0)
        self.rho_min = _validation.real("rho_min", rho_min, low=0, high=self.rho, allow_none=True)
        self.lr_max = _validation.real("lr_max", lr_max, low=0, allow_none=True)
        self.lr_min = _validation.real("lr_min", lr_min, low=0, allow_none=True)
        if self.lr_max is not None and self.lr_min is None:
            raise ValueError(
                "`lr_max` needs `lr_min`: pass both, or only `lr_min` (then "
                "`lr_max` is read from the optimizer when `fit` starts)."
            )
        if self.lr_max is not None and self.lr_min > self.lr_max:
            raise ValueError(f"`lr_min`={self.lr_min} must be <= `lr_max`={self.lr_max}.")
        self._lr_range = None

    def get_config(self):
        config = super().get_config()
        config.update(
            alpha=self.alpha, rho_min=self.rho_min, lr_max=self.lr_max, lr_min=self.lr_min
        )
        return config

    def learning_rate_range(self):
        """`(lr_max, lr_min)` of the radius rule, from the compiled optimizer.

        Raises:
            ValueError: when the range of the optimizer's schedule is unknown
                and `lr_max` / `lr_min` were not passed.
        """
        if self.lr_max is not None:
            return self.lr_max, self.lr_min
        lr = optimizer_internals.learning_rate_schedule(self.optimizer)
        if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
            top, bottom = _schedule_range(lr)
        else:
            rate = optimizer_internals.rate_optimizer(self.optimizer).learning_rate
            top, bottom = float(ops.convert_to_numpy(rate)), 0.0
        return top, bottom if self.lr_min is None else self.lr_min

    def _before_fit(self, bound):
        x = super()._before_fit(bound)
        if self.rho_min is None or self.optimizer is None:
            return x
        lr_range = self.learning_rate_range()
        if lr_range[1] > lr_range[0]:
            raise ValueError(
                f"GSAMModel: `lr_min`={lr_range[1]} is above the learning rate "
                f"{lr_range[0]} read as `lr_max` when fit starts; pass `lr_max` "
                "(the rate the radius `rho` belongs to) or a smaller `lr_min`."
            )
        if lr_range != self._lr_range:
            # The range is a constant of the traced step: trace it anew.
            self._lr_range = lr_range
            self.train_function = None
        return x

    def current_rho(self):
        if self.rho_min is None:
            return self.rho
        if self._lr_range is None:  # a step outside `fit` (train_on_batch)
            lr = optimizer_internals.learning_rate_schedule(self.optimizer)
            if self.lr_max is None and not isinstance(
                lr, keras.optimizers.schedules.LearningRateSchedule
            ):
                raise RuntimeError(
                    "GSAMModel with `rho_min` and a float learning rate reads "
                    "`lr_max` from the optimizer when `fit` starts; outside "
                    "`fit`, pass `lr_max` and `lr_min` to GSAMModel."
                )
            self._lr_range = self.learning_rate_range()
        lr_max, lr_min = self._lr_range
        rate = optimizer_internals.rate_optimizer(self.optimizer).learning_rate
        return rules.gsam_rho(rate, self.rho, self.rho_min, lr_max, lr_min)

    def descent(self, gradients, perturbed_gradients):
        return rules.gsam_descent(gradients, perturbed_gradients, self.alpha)


def _schedule_range(lr):
    """The (max, min) learning rate of a known schedule."""
    schedules = keras.optimizers.schedules
    if hasattr(lr, "max_learning_rate") and hasattr(lr, "min_learning_rate"):
        return float(lr.max_learning_rate), float(lr.min_learning_rate)
    if isinstance(lr, schedules.CosineDecay):
        top = lr.warmup_target if lr.warmup_target is not None else lr.initial_learning_rate
        return float(top), float(top * lr.alpha)
    if isinstance(lr, (schedules.ExponentialDecay, schedules.PolynomialDecay)):
        end = getattr(lr, "end_learning_rate", 0.0)
        return float(max(lr.initial_learning_rate, end)), float(min(lr.initial_learning_rate, end))
    raise ValueError(
        f"GSAMModel cannot tell the learning-rate range of {type(lr).__name__}; "
        "pass `lr_max` and `lr_min` to GSAMModel (the largest and smallest "
        "learning rate of your schedule), or leave `rho_min=None` for a "
        "constant rho."
    )
