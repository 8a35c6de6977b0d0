"""AESAMModel: a SAM step where the squared gradient norm is high against
its moving moments, a plain step elsewhere (Jiang et al., ICLR 2023;
`keras_sam.rules.aesam_decision`)."""

import keras
from keras import ops

from keras_sam import _validation
from keras_sam import rules
from keras_sam.models._replicas import loss_scale
from keras_sam.models.sam import SAMModel
from keras_sam.models.sam import _no_splits


@keras.saving.register_keras_serializable(package="keras_sam")
class AESAMModel(SAMModel):
    """Wraps a Keras model so that `fit` takes SAM steps only where the loss
    looks sharp: AE-SAM's adaptive policy.

    AE-SAM (Jiang et al., ICLR 2023) tracks exponential moving averages of
    the mean `mu` and variance `var` of the squared gradient norm
    `s = ||g||^2` (decay `decay`) and takes a SAM step when
    `s >= mu + c * sqrt(var)`, else a plain step with the clean gradient
    (one gradient evaluation). `c` moves linearly from `threshold` to
    `threshold_end` over `total_steps` steps (constant without them); a
    larger `c` means fewer SAM steps: about `1 - Phi(c)` of the steps for a
    normally distributed `s`, e.g. 24% at `c = 0.7`. `g` is the global
    (all-reduced) gradient, so every replica decides alike; `mu` and `var` are
    non-trainable variables of the wrapper, kept by `model.save` and
    `BackupAndRestore`. History logs `sam_fraction`, the share of SAM steps.

    Args:
        model: the `keras.Model` to train, built.
        rho: SAM's radius.
        threshold: `c` at the first step.
        threshold_end: `c` after `total_steps` steps (None: `threshold`).
        total_steps: steps over which `c` moves (needed with `threshold_end`).
        decay: decay of the moving averages, in `[0, 1)` (AE-SAM's 0.9).
        **kwargs: the keywords of `SAMModel` (`adaptive`, `eta`,
            `sync_perturbation`, `sam_start_epoch`); sub-batches are not
            supported.

    Example:

    ```python
    model = keras_sam.AESAMModel(inner, rho=0.05, threshold=0.7)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=...)
    history = model.fit(x, y, epochs=10)   # history.history["sam_fraction"]
    ```
    """

    def __init__(
        self,
        model,
        rho=0.05,
        threshold=0.7,
        threshold_end=None,
        total_steps=None,
        decay=0.9,
        **kwargs,
    ):
        self.threshold = _validation.real("threshold", threshold)
        self.threshold_end = _validation.real("threshold_end", threshold_end, allow_none=True)
        self.total_steps = _validation.integer("total_steps", total_steps, low=1, allow_none=True)
        if (self.threshold_end is None) != (self.total_steps is None):
            raise ValueError(
                "`threshold_end` and `total_steps` go together: pass both "
                "(c moves linearly from `threshold` to `threshold_end`), or neither."
            )
        self.decay = _validation.real("decay", decay, low=0, high=1, high_inclusive=False)
        if kwargs.pop("sam_every", 1) != 1:
            raise ValueError(
                "AESAMModel decides at every step whether to take a SAM step; "
                "`sam_every` must be 1 (use `threshold` to take fewer SAM steps)."
            )
        super().__init__(model, rho=rho, **kwargs)
        _no_splits("AESAMModel", self)

    def get_config(self):
        config = super().get_config()
        config.pop("sam_every")
        config.update(
            threshold=self.threshold,
            threshold_end=self.threshold_end,
            total_steps=self.total_steps,
            decay=self.decay,
        )
        return config

    def build_state(self):
        self.add_state("aesam_mean")
        self.add_state("aesam_variance")

    def should_perturb(self, gradients, state):
        """A SAM step where `||g||^2 >= mu + c sqrt(var)` (moving moments)."""
        scale = loss_scale(self.optimizer)
        squared_norm = ops.square(rules.global_norm(gradients) / scale)
        iteration = ops.cast(ops.convert_to_tensor(self.optimizer.iterations), "float32")
        c = self.threshold
        if self.total_steps is not None:
            progress = ops.minimum(iteration / self.total_steps, 1.0)
            c = c + (self.threshold_end - c) * progress
        mean, variance, do_sam = rules.aesam_decision(
            squared_norm, state["aesam_mean"], state["aesam_variance"], self.decay, c
        )
        return do_sam, {"aesam_mean": mean, "aesam_variance": variance}
