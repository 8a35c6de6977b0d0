"""SAMModel: any Keras model trained with SAM or ASAM through plain `fit`.

The method in one screen: `perturbation` (SAM's `e = rho g / ||g||`, ASAM's
scaled form); the descent along the gradient at `w + e` is the default of
`TwoGradientModel` (`keras_sam.models.method`), the math is in
`keras_sam.rules`. Where the step runs (the two gradient passes, sub-batches,
replicas, the train steps) is the engine's (`keras_sam.models.engine`); which
kind of step runs next (`sam_every`, `sam_start_epoch`) is chosen on the host
by `keras_sam.models.host_steps`.
"""

import keras

from keras_sam import _validation
from keras_sam import rules
from keras_sam.models.engine import TRAINING_STATISTICS  # noqa: F401 (public name)
from keras_sam.models.method import TwoGradientModel

ADAPTIVE_SCOPES = ("weights", "kernels", "all")
"""Which variables ASAM scales by `T_w = |w| + eta` (see `asam_scaled`)."""


def asam_scaled(variables, scope):
    """Which variables ASAM scales, for an `adaptive_scope`.

    - `"weights"` (the official ASAM code's rule, which scales every
      parameter whose PyTorch name contains `weight`): every variable except
      biases (`bias`, `*_bias`) and normalization offsets (`beta`), so kernels,
      embeddings and normalization scales (`gamma`) are scaled;
    - `"kernels"`: variables with two or more dimensions only;
    - `"all"`: every variable.

    Returns:
        A list of booleans matching `variables`.
    """
    if scope == "all":
        return [True for _ in variables]
    if scope == "kernels":
        return [len(v.shape) >= 2 for v in variables]
    return [not (v.name in ("bias", "beta") or v.name.endswith("_bias")) for v in variables]


@keras.saving.register_keras_serializable(package="keras_sam")
class SAMModel(TwoGradientModel):
    """Wraps a Keras model so that `fit` trains it with SAM or adaptive SAM.

    Each training step evaluates the gradient `g` of the loss on the batch,
    moves the weights to `w + e` with `e = rho * g / ||g||` (ASAM:
    `e = rho * T_w^2 g / ||T_w g||`, `T_w = |w| + eta`), evaluates the gradient
    `g_p` there on the same batch, and lets the compiled optimizer apply `g_p`
    at the original weights `w`. `||.||` is one global norm over all trainable
    variables.

    What is logged: `loss` and the compiled metrics (per-output losses too)
    come from the CLEAN pass (at `w`, as plain Keras reports them). Three more
    entries are averaged over each training epoch: `sharpness`, the SAM
    estimate `L(w + e) - L(w)` (the surrogate gap); `grad_norm`, `||g||` of
    the clean gradient (of the replica's own batch by default, of the global
    batch with `sync_perturbation=True`); and `rho`, the radius used. They
    are training statistics: `evaluate()` and validation do not report them.

    State: both passes run in training mode from the same starting state;
    BatchNorm moving statistics (and every other non-trainable variable) are
    updated once per step, by the clean pass. Kernel regularizers, `add_loss`
    terms and `sample_weight` count in both gradients.

    ASAM (`adaptive=True`) follows the official ASAM code by default
    (`adaptive_scope="weights"`): it scales every variable except biases and
    normalization offsets (`beta`), i.e. kernels, embeddings and
    normalization scales (`gamma`). `"kernels"` scales variables with two or
    more dimensions only, `"all"` every variable.

    Under `tf.distribute.MirroredStrategy`, and on JAX under
    `keras.distribution.DataParallel` over several devices, each replica
    (device) perturbs with its own batch slice by default (m-sharpness, as in
    the SAM and GSAM papers), and only the descent gradient is all-reduced:
    the result equals `num_batch_splits=<replicas>` on one device.
    `sync_perturbation=True` all-reduces `g` first, so `e` is the same on
    every replica and the result does not depend on the replica count.

    Mixed precision (`mixed_float16`): both losses are scaled by the compiled
    `LossScaleOptimizer`; a step whose gradients are not finite on ANY replica
    is skipped on all of them, and then no variable changes: neither the
    weights nor BatchNorm statistics or other non-trainable state.

    Args:
        model: the `keras.Model` to train (Sequential, functional or
            subclassed), already built.
        rho: radius of the perturbation, `>= 0` (SAM: 0.05 on CIFAR-10;
            ASAM: ~10x larger). `rho=0` is plain training.
        adaptive: `True` for ASAM.
        eta: ASAM's offset in `T_w = |w| + eta`, `>= 0`.
        adaptive_scope: `"weights"`, `"kernels"` or `"all"`, which variables
            ASAM scales (see above and `asam_scaled`).
        sync_perturbation: all-reduce the clean gradient across replicas
            before perturbing.
        num_batch_splits: split each replica's batch into this many equal
            sub-batches, each with its own perturbation (m-sharpness on one
            device); the descent gradients are averaged. It must divide the
            per-replica batch size (checked on the first batch, before any
            weight changes); a last partial batch is cut into parts whose
            sizes differ by at most one.
        sam_every: take the SAM step (two gradient evaluations) only when
            the step count (`optimizer.iterations`) is a multiple of
            `sam_every`, and a plain step with the clean gradient (one
            evaluation) otherwise. `1` (default): every step. In `fit` the
            kind of each step is chosen on the host before it runs, so a
            plain step is a separately compiled function that costs what a
            plain Keras step costs (`keras_sam.models.host_steps`; with
            `steps_per_execution > 1` the choice is made inside the compiled
            step). History then also logs `sam_fraction`, and `sharpness` /
            `rho` average the SAM steps only.
        sub_batch_size: alternative to `num_batch_splits`: sub-batches of this
            many examples, so m stays fixed when the batch size grows (with
            `keras_sam.callbacks.BatchSizeScheduler`). A batch of `b` examples
            is cut into `ceil(b / sub_batch_size)` parts, also when its size is
            known only when the step runs.
        noise_scale: estimate the gradient noise scale `B_simple =
            tr(Sigma) / |G|^2` (McCandlish et al. 2018) in every step and log
            it in History as `noise_scale` (the value after the epoch's last
            step), for `keras_sam.callbacks.AdaptiveBatchSize`. It compares
            the clean gradients of the step's parts (its sub-batches and
            replicas) with their mean, so it costs no gradient evaluation;
            with one part (one device, no sub-batches) the clean gradient is
            evaluated as the mean of the gradients of the two halves of the
            batch (the same work; with BatchNorm each half is normalized by
            its own statistics, and Dropout draws its own mask per half,
            other than the perturbed pass's mask). The loss must be
            mean-reduced (Keras' default `"sum_over_batch_size"`), checked
            in `fit`.
        noise_scale_decay: the decay of the moving averages of `|G|^2` and
            `tr(Sigma)` over steps, in `[0, 1)`; they are non-trainable
            variables of the wrapper, so checkpoints keep them.
        sam_start_epoch: late-phase SAM (Zhou et al., ICLR 2025): plain
            steps (the clean gradient, as plain Keras) in the epochs before
            this one, counted from 0 as Keras counts them, and the wrapper's
            usual steps from it on. `0` (default): from the start. Epochs are
            those of `fit` (`initial_epoch` and `BackupAndRestore` included);
            `train_on_batch` takes the usual steps.
        **kwargs: passed to `keras.Model` (e.g. `name`).

    Example:

    ```python
    inner = keras.Sequential([keras.Input((784,)), keras.layers.Dense(10)])
    model = keras_sam.SAMModel(inner, rho=0.05)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=3)   # history has loss, sharpness, grad_norm, rho
    ```
    """

    def __init__(
        self,
        model,
        rho=0.05,
        adaptive=False,
        eta=0.01,
        sync_perturbation=False,
        num_batch_splits=None,
        sub_batch_size=None,
        adaptive_scope="weights",
        sam_every=1,
        noise_scale=False,
        noise_scale_decay=0.99,
        sam_start_epoch=0,
        **kwargs,
    ):
        self.rho = _validation.real("rho", rho, low=0)
        self.eta = _validation.real("eta", eta, low=0)
        self.adaptive = bool(adaptive)
        self.adaptive_scope = _validation.one_of("adaptive_scope", adaptive_scope, ADAPTIVE_SCOPES)
        super().__init__(
            model,
            sync_perturbation=sync_perturbation,
            num_batch_splits=num_batch_splits,
            sub_batch_size=sub_batch_size,
            sam_every=sam_every,
            sam_start_epoch=sam_start_epoch,
            noise_scale=noise_scale,
            noise_scale_decay=noise_scale_decay,
            **kwargs,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            rho=self.rho,
            adaptive=self.adaptive,
            eta=self.eta,
            adaptive_scope=self.adaptive_scope,
        )
        return config

    # ---------------------------------------------------------- the method
    def perturbation(self, gradients, variables, rho):
        if self.adaptive:
            scaled = asam_scaled(self.trainable_variables, self.adaptive_scope)
            return rules.asam_perturbation(gradients, variables, rho, self.eta, scaled)
        return rules.sam_perturbation(gradients, rho)

    def _takes_second_pass(self):
        """`rho=0` with SAMModel's radius, perturbation, descent and state:
        the perturbed gradient is the clean one, so no second pass."""
        cls = type(self)
        same = all(
            getattr(cls, name) is getattr(SAMModel, name)
            for name in ("current_rho", "perturbation", "descent", "update_state")
        )
        return not (self.rho == 0 and same)


def _no_splits(cls_name, model):
    if model.num_batch_splits or model.sub_batch_size:
        raise ValueError(
            f"{cls_name} keeps one direction per step for the whole batch: "
            "`num_batch_splits` and `sub_batch_size` must be None."
        )


@keras.saving.register_keras_serializable(package="keras_sam")
class SharpnessAwareMinimization(SAMModel):
    """Drop-in replacement for `tf.keras.models.experimental.SharpnessAwareMinimization`.

    Same signature as the TF 2.10-2.15 class. Two deliberate differences:
    the sub-batch gradients of `num_batch_splits` are AVERAGED (the old class
    summed them, multiplying the step by the number of splits), and the
    regularization losses count in both gradients (the old class dropped them).

    Args:
        model: the `keras.Model` to train, built.
        rho: radius of the perturbation.
        num_batch_splits: number of sub-batches per replica, each perturbed
            with its own gradient; must divide the per-replica batch size.
        name: model name.
    """

    def __init__(self, model, rho=0.05, num_batch_splits=None, name=None, **kwargs):
        super().__init__(model, rho=rho, num_batch_splits=num_batch_splits, name=name, **kwargs)
