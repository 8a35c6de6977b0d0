"""LookSAMModel: SAM's second gradient every k steps, its orthogonal part
reused in between (Liu et al., CVPR 2022; `keras_sam.rules.looksam_*`)."""

import keras

from keras_sam import _validation
from keras_sam import rules
from keras_sam.models.sam import SAMModel
from keras_sam.models.sam import _no_splits


@keras.saving.register_keras_serializable(package="keras_sam")
class LookSAMModel(SAMModel):
    """Wraps a Keras model so that `fit` trains it with LookSAM.

    LookSAM (Liu et al., CVPR 2022) computes SAM's second gradient only every
    `sam_every` steps. On such a refresh step it descends along `g_p` as SAM
    does and stores `g_v`, the component of `g_p` orthogonal to the clean
    gradient `g`; on the other steps it evaluates `g` only and descends along
    `g + alpha * (||g|| / ||g_v||) * g_v`. `sam_every=1` is SAM exactly.
    `g_v` is a set of non-trainable variables of the wrapper, so `model.save`
    and `BackupAndRestore` keep it. Under `MirroredStrategy`, `g_v` and the
    reuse step use the all-reduced gradients, so every replica holds the same
    `g_v`. The refresh steps are those with `optimizer.iterations %
    sam_every == 0`; `fit` chooses refresh and reuse steps on the host, each
    its own compiled function (see `SAMModel`'s `sam_every`), and
    `sam_start_epoch` gives plain steps before a late phase.

    Args:
        model: the `keras.Model` to train, built.
        rho: SAM's radius.
        sam_every: steps per refresh (LookSAM's k), `>= 1`.
        alpha: weight of the reused direction, `>= 0` (LookSAM's 0.7).
        **kwargs: the keywords of `SAMModel` (`adaptive`, `eta`,
            `sync_perturbation`, `sam_start_epoch`); sub-batches are not
            supported.

    Example:

    ```python
    model = keras_sam.LookSAMModel(inner, rho=0.05, sam_every=5, alpha=0.7)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=...)
    model.fit(x, y, epochs=10)   # about 1.2x the cost of a plain step
    ```
    """

    def __init__(self, model, rho=0.05, sam_every=5, alpha=0.7, **kwargs):
        self.alpha = _validation.real("alpha", alpha, low=0)
        super().__init__(model, rho=rho, sam_every=sam_every, **kwargs)
        _no_splits("LookSAMModel", self)

    def get_config(self):
        config = super().get_config()
        config.update(alpha=self.alpha)
        return config

    def build_state(self):
        self.add_state("looksam_direction", like="trainable_variables")

    def update_state(self, state, gradients, perturbed_gradients):
        """A SAM step stores `g_v`, the part of `g_p` orthogonal to `g`."""
        return {"looksam_direction": rules.looksam_direction(gradients, perturbed_gradients)}

    def between_descent(self, gradients, state):
        """`g + alpha (||g|| / ||g_v||) g_v` between SAM steps."""
        return rules.looksam_reuse(gradients, state["looksam_direction"], self.alpha)
