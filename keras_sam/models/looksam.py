"""LookSAMModel: SAM's second gradient every k steps, its orthogonal part
reused in between (Liu et al., CVPR 2022; `keras_sam.rules.looksam_*`)."""

import keras

from keras_sam import _validation
from keras_sam import backend as sam_backend
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
        self._g_v = {}
        super().__init__(model, rho=rho, sam_every=sam_every, **kwargs)
        _no_splits("LookSAMModel", self)

    def get_config(self):
        config = super().get_config()
        config.update(alpha=self.alpha)
        return config

    def _build_own_state(self):
        # One slot per trainable variable at build time, found by its path,
        # so freezing a layer later leaves the other slots in place.
        self._g_v = {
            v.path: self.add_weight(
                shape=v.shape,
                dtype=v.dtype,
                initializer="zeros",
                trainable=False,
                autocast=False,
                name=f"looksam_direction_{i}",
            )
            for i, v in enumerate(self.inner.trainable_variables)
        }

    def _own_state_variables(self):
        """The stored direction of each current trainable variable, in order."""
        missing = [v.path for v in self.trainable_variables if v.path not in self._g_v]
        if missing:
            raise ValueError(
                f"LookSAMModel keeps a direction for the variables that were "
                f"trainable when it was built; {missing} became trainable later. "
                "Wrap the model again after changing which layers train."
            )
        return [self._g_v[v.path] for v in self.trainable_variables]

    def _after_sam(self, grads, perturbed, own, summed):
        return rules.looksam_direction(*summed("clean", "perturbed"))

    def _plain_descent(self, grads, own, summed):
        replicas = sam_backend.num_replicas()
        (g,) = summed("clean")  # reduced with `perturbed` in `_after_sam`
        extra = rules.looksam_reuse(g, own, self.alpha)
        return [gi + (d - g_all) / replicas for gi, d, g_all in zip(grads, extra, g)]
