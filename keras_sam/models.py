"""SAMModel, GSAMModel and SharpnessAwareMinimization: any Keras model, trained
with a sharpness-aware step through plain `model.fit`.

The step (`_sam_step`) is written once, with `keras.ops` and the two gradient
evaluations of `keras_sam.backend`; the math it calls lives in
`keras_sam.rules`. Both passes evaluate the model statelessly on the SAME batch
with the SAME starting state (BatchNorm statistics, dropout seeds), in training
mode; only the clean pass's state updates are kept, so BatchNorm moving
statistics move once per step.
"""

import math

import keras
from keras import ops
from keras import tree

from keras_sam import _keras_compat
from keras_sam import backend as sam_backend
from keras_sam import rules

_ADAPTIVE_SCOPES = ("kernels", "all")


def _check_nonnegative(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a float >= 0, got {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite float >= 0, got {value!r}.")
    return float(value)


def _check_splits(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be None or an int >= 1, got {value!r}.")
    return value


def _batch_size(x):
    first = next(t for t in tree.flatten(x) if t is not None)
    return ops.shape(first)[0]


def _split(structure, num_splits):
    """Cuts every tensor of a nested structure into `num_splits` parts along
    the batch axis (equal parts when the batch divides, else sizes differing by
    at most one); returns a list of `num_splits` structures."""
    if structure is None:
        return [None] * num_splits
    size = _batch_size(structure)
    bounds = [i * size // num_splits for i in range(num_splits + 1)]
    return [
        tree.map_structure(lambda t, a=a, b=b: t[a:b], structure)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]


def _static_batch_size(x):
    first = next(t for t in tree.flatten(x) if t is not None)
    size = first.shape[0]
    return None if size is None else int(size)


def _first_batch_size(x, batch_size):
    """The global batch size `fit` will use, or None if it cannot be told
    without consuming data."""
    import tensorflow as tf

    if isinstance(x, tf.data.Dataset):
        first = tree.flatten(x.element_spec)[0]
        if first.shape.rank and first.shape[0] is not None:
            return int(first.shape[0])
        for batch in x.take(1):
            return int(tree.flatten(batch)[0].shape[0])
        return None
    if hasattr(x, "shape") or isinstance(x, (list, tuple, dict)):
        return 32 if batch_size is None else int(batch_size)
    return None


@keras.saving.register_keras_serializable(package="keras_sam")
class SAMModel(keras.Model):
    """Wraps a Keras model so that `fit` trains it with SAM or adaptive SAM.

    Each training step evaluates the gradient `g` of the loss on the batch,
    moves the weights to `w + e` with `e = rho * g / ||g||` (ASAM:
    `e = rho * T_w^2 g / ||T_w g||`, `T_w = |w| + eta`), evaluates the gradient
    `g_p` there on the same batch, and lets the compiled optimizer apply `g_p`
    at the original weights `w`. `||.||` is one global norm over all trainable
    variables.

    What is logged: `loss` and the compiled metrics come from the CLEAN pass
    (at `w`, as plain Keras reports them). Three more entries are averaged over
    each epoch: `sharpness`, the SAM estimate `L(w + e) - L(w)` (the surrogate
    gap); `grad_norm`, `||g||` of the clean gradient (of the replica's own
    batch by default, of the global batch with `sync_perturbation=True`); and
    `rho`, the radius used.

    State: both passes run in training mode from the same starting state;
    BatchNorm moving statistics (and every other non-trainable variable) are
    updated once per step, by the clean pass. Kernel regularizers, `add_loss`
    terms and `sample_weight` count in both gradients.

    ASAM (`adaptive=True`) scales kernels only by default (variables with two
    or more dimensions: dense/conv kernels, embeddings), as the official ASAM
    code does; biases and normalization parameters get `T_w = 1`. Pass
    `adaptive_scope="all"` to scale every variable.

    Under `tf.distribute.MirroredStrategy` each replica perturbs with its own
    batch slice by default (m-sharpness, as in the SAM and GSAM papers), and
    only the descent gradient is all-reduced. `sync_perturbation=True`
    all-reduces `g` first, so `e` is the same on every replica and the result
    does not depend on the replica count.

    Mixed precision (`mixed_float16`): both losses are scaled by the compiled
    `LossScaleOptimizer`; a step whose gradients are not finite on ANY replica
    is skipped on all of them.

    Args:
        model: the `keras.Model` to train (Sequential, functional or
            subclassed), already built.
        rho: radius of the perturbation, `>= 0` (SAM: 0.05 on CIFAR-10;
            ASAM: ~10x larger). `rho=0` is plain training.
        adaptive: `True` for ASAM.
        eta: ASAM's offset in `T_w = |w| + eta`, `>= 0`.
        adaptive_scope: `"kernels"` or `"all"`, which variables ASAM scales.
        sync_perturbation: all-reduce the clean gradient across replicas
            before perturbing.
        num_batch_splits: split each replica's batch into this many equal
            sub-batches, each with its own perturbation (m-sharpness on one
            device); the descent gradients are averaged. It must divide the
            per-replica batch size (checked when `fit` starts); a last partial
            batch is cut into parts whose sizes differ by at most one.
        sub_batch_size: alternative to `num_batch_splits`: sub-batches of this
            many examples, so m stays fixed when the batch size grows (with
            `keras_sam.callbacks.BatchSizeScheduler`, batch the data with
            `drop_remainder=True` so each batch size is traced on its own).
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
        adaptive_scope="kernels",
        **kwargs,
    ):
        allow_unbuilt = kwargs.pop("_allow_unbuilt", False)
        if not isinstance(model, keras.Model):
            raise TypeError(
                "`model` must be a keras.Model (Sequential, functional or "
                f"subclassed), got {type(model).__name__}."
            )
        if not (model.built and model.variables) and not allow_unbuilt:
            raise ValueError(
                f"`model` ({model.name}) is not built, so its variables do not "
                "exist yet. Build it first: give it an `keras.Input`, call it "
                "on a batch, or call `model.build(input_shape)`."
            )
        self.rho = _check_nonnegative("rho", rho)
        self.eta = _check_nonnegative("eta", eta)
        self.adaptive = bool(adaptive)
        if adaptive_scope not in _ADAPTIVE_SCOPES:
            raise ValueError(
                f"`adaptive_scope` must be one of {_ADAPTIVE_SCOPES}, got "
                f"{adaptive_scope!r}."
            )
        self.adaptive_scope = adaptive_scope
        self.sync_perturbation = bool(sync_perturbation)
        self.num_batch_splits = _check_splits("num_batch_splits", num_batch_splits)
        self.sub_batch_size = _check_splits("sub_batch_size", sub_batch_size)
        if self.num_batch_splits and self.sub_batch_size:
            raise ValueError(
                "Pass at most one of `num_batch_splits` and `sub_batch_size`."
            )
        super().__init__(**kwargs)
        self.inner = model
        self._sharpness_tracker = keras.metrics.Mean(name="sharpness")
        self._grad_norm_tracker = keras.metrics.Mean(name="grad_norm")
        self._rho_tracker = keras.metrics.Mean(name="rho")
        self._fit_batch_size = None
        if model.built:
            self.built = True

    # ----------------------------------------------------------- keras.Model
    def call(self, inputs, training=None):
        return self.inner(inputs, training=training)

    def build(self, input_shape=None):
        if not self.inner.built:
            self.inner.build(input_shape)
        self.built = True

    def get_config(self):
        config = super().get_config()
        config.update(
            model=keras.saving.serialize_keras_object(self.inner),
            rho=self.rho,
            adaptive=self.adaptive,
            eta=self.eta,
            sync_perturbation=self.sync_perturbation,
            num_batch_splits=self.num_batch_splits,
            sub_batch_size=self.sub_batch_size,
            adaptive_scope=self.adaptive_scope,
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects
        )
        config.pop("trainable", None)
        config.pop("dtype", None)
        return cls(model, _allow_unbuilt=True, **config)

    # ------------------------------------------------------- batch splitting
    def num_splits(self, batch_size):
        """Sub-batches per replica for a per-replica batch of `batch_size`.

        Raises:
            ValueError: if `num_batch_splits` / `sub_batch_size` does not
                divide `batch_size`.
        """
        if self.num_batch_splits:
            k, name = self.num_batch_splits, "num_batch_splits"
        elif self.sub_batch_size:
            k, name = None, "sub_batch_size"
        else:
            return 1
        if batch_size is None:
            return k
        if k is None:
            if batch_size % self.sub_batch_size:
                raise ValueError(
                    f"`sub_batch_size`={self.sub_batch_size} does not divide the "
                    f"per-replica batch size {batch_size}."
                )
            return batch_size // self.sub_batch_size
        if batch_size % k:
            raise ValueError(
                f"`{name}`={k} does not divide the per-replica batch size "
                f"{batch_size}. Use a batch size that is a multiple of {k} "
                "(and drop the last partial batch)."
            )
        return k

    def fit(self, x=None, y=None, batch_size=None, **kwargs):
        """`keras.Model.fit`, with the batch split checked before training."""
        if self.num_batch_splits or self.sub_batch_size:
            size = _first_batch_size(x, batch_size)
            if size is not None:
                strategy = getattr(self, "distribute_strategy", None)  # TF only
                per_replica = size // getattr(strategy, "num_replicas_in_sync", 1)
                self.num_splits(per_replica)  # raises if the split does not divide
                self._fit_batch_size = per_replica
        return super().fit(x, y, batch_size=batch_size, **kwargs)

    # ------------------------------------------------------------- the step
    def current_rho(self):
        """The radius for this step (a float; GSAMModel ties it to the lr)."""
        return self.rho

    def _perturbation(self, grads, weights, rho):
        if self.adaptive:
            scaled = [
                self.adaptive_scope == "all" or len(v.shape) >= 2
                for v in self.trainable_variables
            ]
            return rules.asam_perturbation(grads, weights, rho, self.eta, scaled)
        return rules.sam_perturbation(grads, rho)

    _descent_uses_clean_gradient = False

    def _descent(self, grads, perturbed_grads):
        """How the two gradients combine; SAM takes the perturbed one."""
        return list(perturbed_grads)

    def _loss_and_state(self, weights, state, x, y, sample_weight):
        """One stateless forward pass in training mode at `weights`, `state`.

        Returns `(scaled_loss, (loss, y_pred, new_state, metric_updates))`.
        """
        mapping = list(zip(self.trainable_variables, weights))
        mapping += list(zip(self.non_trainable_variables, state))
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            y_pred = self(x, training=True)
            loss = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
        new_state = [scope.get_current_value(v) for v in self.non_trainable_variables]
        # Metrics written by compute_loss (per-output losses); None if untouched.
        metric_updates = [scope.get_current_value(v) for v in self.metrics_variables]
        scaled = self.optimizer.scale_loss(loss) if self.optimizer else loss
        return scaled, (loss, y_pred, new_state, metric_updates)

    def _sam_step(self, weights, state, x, y, sample_weight):
        """Descent gradients and new state for one batch (one replica)."""
        grad_fn = sam_backend.value_and_grad(self._loss_and_state)
        rho = self.current_rho()
        replicas = sam_backend.num_replicas()

        (_, (loss, y_pred, new_state, metric_updates)), grads = grad_fn(
            weights, state, x, y, sample_weight
        )
        ascent = grads
        if self.sync_perturbation and replicas > 1:
            ascent = sam_backend.all_reduce(grads, "sum")
        e = self._perturbation(ascent, weights, rho)
        (_, (loss_adv, _, _, _)), perturbed = grad_fn(
            [w + ei for w, ei in zip(weights, e)], state, x, y, sample_weight
        )
        if self.sync_perturbation and replicas > 1 and self._descent_uses_clean_gradient:
            # The combination needs the global gradients; every replica
            # computes the same global direction and hands apply() its share.
            g_all = ascent
            gp_all = sam_backend.all_reduce(perturbed, "sum")
            descent = [d / replicas for d in self._descent(g_all, gp_all)]
        else:
            descent = self._descent(grads, perturbed)
        grad_norm = rules.global_norm(ascent)
        if not self.sync_perturbation:
            grad_norm = grad_norm * replicas
        stats = dict(
            loss=loss,
            sharpness=(loss_adv - loss) * replicas,
            grad_norm=grad_norm / self._loss_scale(),
            rho=rho,
        )
        return descent, new_state, y_pred, metric_updates, stats

    def _loss_scale(self):
        scale = getattr(self.optimizer, "dynamic_scale", None)
        return 1.0 if scale is None else ops.cast(scale, "float32")

    def _step_on_batch(self, weights, state, x, y, sample_weight):
        """Runs `_sam_step` on the whole batch or on `num_splits` sub-batches.

        With sub-batches each gets its own perturbation and the descent
        gradients are averaged; floating-point state (BatchNorm statistics)
        becomes the mean of the sub-batches' updates (for BatchNorm: one
        update with the mean of the sub-batch statistics), other state (seed
        counters) is carried from one sub-batch to the next.
        """
        splits = self._splits_for(_static_batch_size(x))
        if splits == 1:
            return self._sam_step(weights, state, x, y, sample_weight)
        xs, ys, sws = (_split(t, splits) for t in (x, y, sample_weight))
        is_float = [keras.backend.is_float_dtype(v.dtype) for v in self.non_trainable_variables]
        carried = list(state)
        outs = []
        for xi, yi, swi in zip(xs, ys, sws):
            start = [s if f else c for s, c, f in zip(state, carried, is_float)]
            out = self._sam_step(weights, start, xi, yi, swi)
            carried = out[1]
            outs.append(out)
        descent = [ops.mean(ops.stack(ds), axis=0) for ds in zip(*(o[0] for o in outs))]
        new_state = [
            ops.mean(ops.stack(ss), axis=0) if f else ss[-1]
            for f, ss in zip(is_float, zip(*(o[1] for o in outs)))
        ]
        y_pred = tree.map_structure(
            lambda *ps: ops.concatenate(ps, axis=0), *(o[2] for o in outs)
        )
        stats = {
            k: ops.mean(ops.stack([ops.cast(o[4][k], "float32") for o in outs]))
            for k in outs[0][4]
        }
        return descent, new_state, y_pred, outs[-1][3], stats

    def _splits_for(self, static_batch_size):
        if static_batch_size is not None:
            return self.num_splits(static_batch_size)
        if self.sub_batch_size and self._fit_batch_size is None:
            raise ValueError(
                "`sub_batch_size` needs the batch size when the step is traced: "
                "batch the dataset with `drop_remainder=True`."
            )
        if self.sub_batch_size:
            return self.num_splits(self._fit_batch_size)
        return self.num_splits(None)

    def _apply(self, descent, variables):
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            if sam_backend.num_replicas() > 1:
                # Keras' LossScaleOptimizer checks only the first replica's
                # gradients for inf/NaN; make every replica see all of them.
                # apply() sums across replicas, so the update is unchanged.
                descent = sam_backend.all_reduce(descent, "mean")
        self.optimizer.apply(descent, variables)

    def _stateful_train_step(self, data):
        """`train_step` for TensorFlow and PyTorch: variables updated in place."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        trainable = self.trainable_variables
        non_trainable = self.non_trainable_variables
        descent, new_state, y_pred, metric_updates, stats = self._step_on_batch(
            sam_backend.read_values(trainable),
            sam_backend.read_values(non_trainable),
            x,
            y,
            sample_weight,
        )
        with sam_backend.no_grad():
            self._apply(descent, trainable)
            for v, value in zip(non_trainable, new_state):
                v.assign(value)
            for v, value in zip(self.metrics_variables, metric_updates):
                if value is not None:
                    v.assign(value)
        self._track(x, stats)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _stateless_train_step(self, state, data):
        """`train_step` for JAX: state in, state out (see Keras' JAX trainer)."""
        trainable, non_trainable, optimizer_vars, metrics_vars = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        mapping = list(zip(self.optimizer.variables, optimizer_vars))
        with keras.StatelessScope(state_mapping=mapping):
            descent, new_state, y_pred, metric_updates, stats = self._step_on_batch(
                trainable, non_trainable, x, y, sample_weight
            )
        trainable, optimizer_vars = self.optimizer.stateless_apply(
            optimizer_vars, descent, trainable
        )
        metrics_vars = [
            old if new is None else new for old, new in zip(metrics_vars, metric_updates)
        ]
        mapping = list(zip(self.metrics_variables, metrics_vars))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self._track(x, stats)
            logs = self.compute_metrics(x, y, y_pred, sample_weight)
        metrics_vars = [scope.get_current_value(v) for v in self.metrics_variables]
        return logs, (trainable, new_state, optimizer_vars, metrics_vars)

    if keras.backend.backend() == "jax":
        train_step = _stateless_train_step
    else:
        train_step = _stateful_train_step

    def _track(self, x, stats):
        replicas = sam_backend.num_replicas()
        self._loss_tracker.update_state(
            stats["loss"] * replicas, sample_weight=_batch_size(x)
        )
        self._sharpness_tracker.update_state(stats["sharpness"])
        self._grad_norm_tracker.update_state(stats["grad_norm"])
        self._rho_tracker.update_state(stats["rho"])


@keras.saving.register_keras_serializable(package="keras_sam")
class GSAMModel(SAMModel):
    """Wraps a Keras model so that `fit` trains it with GSAM.

    GSAM (Zhuang et al., ICLR 2022) takes SAM's two gradients and descends
    along `d = g_p - alpha * g_perp`, where `g_perp` is the part of the clean
    gradient orthogonal to the perturbed gradient (see
    `keras_sam.rules.gsam_descent`). `alpha=0` is SAM exactly.

    The radius follows the optimizer's ACTUAL learning rate at each step:
    `rho_t = rho_min + (rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min)`.
    It is constant (`rho`) when `rho_min` is None or the learning rate is
    constant. `lr_max` / `lr_min` default to the range of the compiled
    optimizer's schedule when it tells them (keras_sam schedules, Keras'
    CosineDecay, ExponentialDecay, PolynomialDecay); otherwise pass them.

    Args:
        model: the `keras.Model` to train, built.
        rho: the radius at the largest learning rate (GSAM's rho_max).
        alpha: weight of the orthogonal correction, `>= 0`.
        rho_min: the radius at the smallest learning rate, in `[0, rho]`;
            None keeps `rho` constant.
        lr_max, lr_min: learning-rate range of the schedule (see above).
        **kwargs: the keywords of `SAMModel` (`adaptive`, `eta`,
            `sync_perturbation`, `num_batch_splits`, ...).

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
        self.alpha = _check_nonnegative("alpha", alpha)
        if rho_min is not None:
            rho_min = _check_nonnegative("rho_min", rho_min)
            if rho_min > self.rho:
                raise ValueError(
                    f"`rho_min`={rho_min} must be <= `rho`={self.rho}."
                )
        self.rho_min = rho_min
        self.lr_max = None if lr_max is None else _check_nonnegative("lr_max", lr_max)
        self.lr_min = None if lr_min is None else _check_nonnegative("lr_min", lr_min)
        if (self.lr_max is None) != (self.lr_min is None):
            raise ValueError("Pass both `lr_max` and `lr_min`, or neither.")
        if self.lr_max is not None and self.lr_min > self.lr_max:
            raise ValueError(
                f"`lr_min`={self.lr_min} must be <= `lr_max`={self.lr_max}."
            )

    def get_config(self):
        config = super().get_config()
        config.update(
            alpha=self.alpha, rho_min=self.rho_min, lr_max=self.lr_max, lr_min=self.lr_min
        )
        return config

    def learning_rate_range(self):
        """`(lr_max, lr_min)` used by the radius rule."""
        if self.lr_max is not None:
            return self.lr_max, self.lr_min
        return _schedule_range(_keras_compat.learning_rate_schedule(self.optimizer))

    def current_rho(self):
        if self.rho_min is None:
            return self.rho
        lr_max, lr_min = self.learning_rate_range()
        return rules.gsam_rho(
            self.optimizer.learning_rate, self.rho, self.rho_min, lr_max, lr_min
        )

    _descent_uses_clean_gradient = True

    def _descent(self, grads, perturbed_grads):
        return rules.gsam_descent(grads, perturbed_grads, self.alpha)


def _schedule_range(lr):
    """The (max, min) learning rate of a constant or a known schedule."""
    schedules = keras.optimizers.schedules
    if not isinstance(lr, schedules.LearningRateSchedule):
        value = float(ops.convert_to_numpy(lr))
        return value, value
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
        super().__init__(
            model, rho=rho, num_batch_splits=num_batch_splits, name=name, **kwargs
        )
