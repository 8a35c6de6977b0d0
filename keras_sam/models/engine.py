"""The step engine every wrapper of `keras_sam.models` runs on.

`StepEngine` is a `keras.Model` around the user's model whose `train_step`
evaluates the gradient passes of one sharpness-aware step statelessly (the
clean pass at `w`, the perturbed pass at `w + e` from the SAME starting state:
BatchNorm statistics, dropout seeds), in training mode; only the clean pass's
state updates are kept, so BatchNorm moving statistics move once per step. It
also holds what every method shares: sub-batches (m-sharpness), replicas and
devices (`tf.distribute`, JAX `DataParallel`), the gradient noise scale, mixed
precision, the stateful (TensorFlow, PyTorch) and stateless (JAX) train
steps, and the choice of the kind of step (`keras_sam.models.host_steps`).

A method is a subclass that fills in the hooks (`SAMModel` in `sam.py` is the
reference one): `current_rho`, `_perturbation` and `_descent` (the SAM step),
`_decide` / `_plain_descent` / `_after_sam` (cheaper schedules),
`_own_state_variables` (state kept across steps).
"""

import inspect
import warnings

import keras
from keras import ops
from keras import tree

from keras_sam import _validation
from keras_sam import backend as sam_backend
from keras_sam import rules
from keras_sam.models import _lora_state
from keras_sam.models import host_steps
from keras_sam.models._batches import _batch_size
from keras_sam.models._batches import _first_batch_size
from keras_sam.models._batches import _static_batch_size

TRAINING_STATISTICS = ("sharpness", "grad_norm", "rho", "sam_fraction", "kl", "noise_scale")
"""Logged by the training step only; `evaluate` and validation omit them."""


class StepEngine(keras.Model):
    """The training step the sharpness-aware wrappers share (not a method
    of its own: subclass it through `SAMModel`).

    Args:
        model: the `keras.Model` to train, built.
        sync_perturbation, num_batch_splits, sub_batch_size, sam_every,
            sam_start_epoch, noise_scale, noise_scale_decay: see `SAMModel`.
        **kwargs: passed to `keras.Model` (e.g. `name`).
    """

    def __init__(
        self,
        model,
        sync_perturbation=False,
        num_batch_splits=None,
        sub_batch_size=None,
        sam_every=1,
        sam_start_epoch=0,
        noise_scale=False,
        noise_scale_decay=0.99,
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
        self.sync_perturbation = bool(sync_perturbation)
        self.num_batch_splits = _validation.integer(
            "num_batch_splits", num_batch_splits, low=1, allow_none=True
        )
        self.sub_batch_size = _validation.integer(
            "sub_batch_size", sub_batch_size, low=1, allow_none=True
        )
        if self.num_batch_splits and self.sub_batch_size:
            raise ValueError("Pass at most one of `num_batch_splits` and `sub_batch_size`.")
        self.sam_every = _validation.integer("sam_every", sam_every, low=1)
        self.sam_start_epoch = _validation.integer("sam_start_epoch", sam_start_epoch, low=0)
        self.noise_scale = _validation.one_of("noise_scale", noise_scale, (False, True))
        self.noise_scale_decay = _validation.real(
            "noise_scale_decay", noise_scale_decay, low=0, high=1, high_inclusive=False
        )
        if self.noise_scale and type(self)._sam_step is not StepEngine._sam_step:
            raise ValueError(
                f"{type(self).__name__} does not estimate the gradient noise scale: "
                "`noise_scale` must be False (SAMModel, GSAMModel, LookSAMModel and "
                "AESAMModel estimate it)."
            )
        self._noise_average = None
        self._saved_lora = None  # LoRA variables read by load_own_variables
        self._host_steps = host_steps.StepClock()
        super().__init__(**kwargs)
        self.inner = model
        logged = self._logged_statistics
        self._sharpness_tracker = self._rho_tracker = None
        if "sharpness" in logged:
            self._sharpness_tracker = keras.metrics.Mean(name="sharpness")
        self._grad_norm_tracker = keras.metrics.Mean(name="grad_norm")
        if "rho" in logged:
            self._rho_tracker = keras.metrics.Mean(name="rho")
        self._sam_fraction_tracker = None
        if self._switches_steps():
            self._sam_fraction_tracker = keras.metrics.Mean(name="sam_fraction")
        if model.built:
            self.built = True
            self._build_own_state()
            self._build_noise_state()

    _logged_statistics = ("sharpness", "grad_norm", "rho")
    """The training statistics History gets besides the loss and metrics."""

    def _switches_steps(self):
        """Whether some steps are plain (then `sam_fraction` is logged)."""
        return self.sam_every > 1 or self.sam_start_epoch > 0

    def _build_own_state(self):
        """Creates the variables of `_own_state_variables` (none here)."""

    def _build_noise_state(self):
        """The moving averages of `|G|^2` and `tr(Sigma)` and the count of
        the steps that measured (`noise_scale=True`)."""
        if self.noise_scale and self._noise_average is None:
            self._noise_average = self.add_weight(
                shape=(3,),
                dtype="float32",
                initializer="zeros",
                trainable=False,
                autocast=False,
                name="noise_scale_averages",
            )

    # ----------------------------------------------------------- keras.Model
    def call(self, inputs, training=None):
        return self.inner(inputs, training=training)

    def build(self, input_shape=None):
        if not self.inner.built:
            self.inner.build(input_shape)
        if not self.built:
            self._build_own_state()
            self._build_noise_state()
        self.built = True

    @property
    def output_names(self):
        """The wrapped model's output names (so that `compile` maps a loss or
        metrics dict onto its outputs); an AttributeError when it has none."""
        return self.inner.output_names

    def export(self, filepath, *args, **kwargs):
        """Exports the wrapped model for inference (`keras.Model.export`).

        The wrapper only changes how `fit` trains; serving runs `model`'s own
        forward pass, so the artifact is the wrapped model's, with the same
        arguments as `keras.Model.export`.
        """
        return self.inner.export(filepath, *args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(
            model=keras.saving.serialize_keras_object(self.inner),
            sync_perturbation=self.sync_perturbation,
            num_batch_splits=self.num_batch_splits,
            sub_batch_size=self.sub_batch_size,
            sam_every=self.sam_every,
            sam_start_epoch=self.sam_start_epoch,
            noise_scale=self.noise_scale,
            noise_scale_decay=self.noise_scale_decay,
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

    # ------------------------------------------- saving (LoRA factors kept)
    def save_own_variables(self, store):
        """The wrapper's own variables, and the wrapped model's LoRA layers'
        variables as they are (see `keras_sam.models._lora_state`)."""
        if self._saved_lora:  # loaded, not yet put back: put back first
            self._restore_lora()
        super().save_own_variables(store)
        _lora_state.save(self.inner, store)

    def load_own_variables(self, store):
        own, self._saved_lora = _lora_state.split(store)
        super().load_own_variables(own)

    def load_weights(self, filepath, *args, **kwargs):
        """`keras.Model.load_weights`, with the LoRA factors put back."""
        super().load_weights(filepath, *args, **kwargs)
        self._restore_lora()

    def _restore_lora(self):
        """Puts back the LoRA variables read by the last load (which Keras
        merged and zeroed); without any, warns about zeroed factors."""
        saved, self._saved_lora = self._saved_lora, None
        if saved:
            _lora_state.restore(self.inner, saved)
        else:
            _lora_state.warn_if_reset(self.inner)

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
            k, name = self.sub_batch_size, "sub_batch_size"
        else:
            return 1
        if batch_size % k:
            raise ValueError(
                f"`{name}`={k} does not divide the per-replica batch size "
                f"{batch_size}. Use a batch size that is a multiple of {k} "
                "(and drop the last partial batch)."
            )
        return k if self.num_batch_splits else batch_size // k

    def _splits_in_step(self, x):
        """Sub-batches for the batch `x` inside the step: an int, or (on
        TensorFlow, batch size unknown at trace time) a scalar tensor."""
        if not (self.num_batch_splits or self.sub_batch_size):
            return 1
        static = _static_batch_size(x)
        if static is not None:
            if self.num_batch_splits:
                return min(self.num_batch_splits, static)
            return -(-static // self.sub_batch_size)
        if self.sync_perturbation and sam_backend.num_replicas() > 1:
            raise ValueError(
                "`sync_perturbation=True` with `num_batch_splits` / "
                "`sub_batch_size` under a tf.distribute strategy needs batch "
                "sizes known when the step is traced: batch the dataset with "
                "`drop_remainder=True`."
            )
        size = _batch_size(x)
        if self.num_batch_splits:  # a tensor too, so both run the same loop
            return ops.minimum(ops.cast(self.num_batch_splits, size.dtype), size)
        return (size + self.sub_batch_size - 1) // self.sub_batch_size

    def fit(self, x=None, y=None, batch_size=None, *args, **kwargs):
        """`keras.Model.fit`, with the batch split and GSAM's learning-rate
        range checked before the first step."""
        from keras_sam._multi_worker import check_not_multi_worker

        check_not_multi_worker(self)  # MultiWorkerMirroredStrategy: clear error
        self._restore_lora()  # after keras.models.load_model
        self._check_per_replica_perturbation()
        if self.noise_scale:
            self._check_mean_reduced_loss()
        if self.num_batch_splits or self.sub_batch_size:
            size, x = _first_batch_size(x, batch_size)
            if size is not None:
                self.num_splits(size // self._replicas_for_splits())
        self._before_fit()
        bound = inspect.signature(keras.Model.fit).bind(self, x, y, batch_size, *args, **kwargs)
        arguments = bound.arguments
        self._warn_if_no_sam_step(arguments.get("epochs", 1))
        if not self._steps_chosen_on_host():
            return super().fit(x, y, batch_size, *args, **kwargs)
        # The host's step clock runs as the last callback, after the user's
        # (BackupAndRestore restores the step count in its on_train_begin).
        callbacks = arguments.get("callbacks")
        clock = self._host_steps
        if isinstance(callbacks, keras.callbacks.CallbackList):
            callbacks.callbacks.append(clock)
            clock.set_model(self)
        else:
            arguments["callbacks"] = (tree.flatten(callbacks) if callbacks else []) + [clock]
        outer = clock.state()  # a fit called from a callback of another fit
        try:
            return super().fit(*bound.args[1:], **bound.kwargs)
        finally:
            clock.set_state(outer)
            if isinstance(callbacks, keras.callbacks.CallbackList):
                callbacks.callbacks.remove(clock)

    def _warn_if_no_sam_step(self, epochs):
        """`sam_start_epoch` at or after the end of this `fit` (epochs `<=`
        `sam_start_epoch`): every step is plain. A warning, not an error:
        a later `fit(..., initial_epoch=...)` may continue into SAM."""
        if self.sam_start_epoch and isinstance(epochs, int) and epochs <= self.sam_start_epoch:
            warnings.warn(
                f"{type(self).__name__}(sam_start_epoch={self.sam_start_epoch}) takes "
                f"its first SAM step in epoch {self.sam_start_epoch} (0-based), but this "
                f"`fit(epochs={epochs})` ends before it: every step of this fit is a plain "
                "step. Pass more `epochs` (a later `fit(..., initial_epoch=...)` continues "
                "into SAM) or a smaller `sam_start_epoch`.",
                stacklevel=3,
            )

    # ------------------------------------------- the kind of the next step
    _decides_from_data = False
    """True for a method whose `_decide` reads the step's data (AE-SAM): its
    choice stays inside the compiled step."""

    def _steps_chosen_on_host(self):
        """Whether `fit` chooses each step's kind on the host (see
        `keras_sam.models.host_steps`)."""
        return self.sam_start_epoch > 0 or self._every_on_host()

    def _every_on_host(self):
        """Whether the `sam_every` schedule is chosen on the host: not for a
        data-driven policy, and not under a LossScaleOptimizer, whose skipped
        steps (non-finite gradients) leave `optimizer.iterations` behind a
        count of the steps taken."""
        return (
            self.sam_every > 1
            and not self._decides_from_data
            and not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        )

    def _host_step_kind(self, step, epoch, per_call):
        """The kind of the call that starts at step `step` (the optimizer's
        count) in epoch `epoch` (None outside `fit`) and runs up to
        `per_call` steps."""
        if epoch is not None and epoch < self.sam_start_epoch:
            return host_steps.PLAIN
        if self._decides_from_data:
            return host_steps.IN_STEP
        if self.sam_every == 1:
            return host_steps.SAM
        if per_call > 1 or not self._every_on_host():  # see _every_on_host
            return host_steps.IN_STEP
        return host_steps.SAM if step % self.sam_every == 0 else host_steps.BETWEEN

    def train_step_of_kind(self, kind):
        """`train_step` for one kind of step (`keras_sam.models.host_steps`):
        it sets the kind, then runs the step (tracing it for that kind)."""
        step = type(self).train_step
        clock = self._host_steps

        def train_step(*args):
            clock.kind = kind
            return step(self, *args)

        return train_step

    def make_train_function(self, force=False):
        """Keras' `make_train_function`. Where `fit` chooses each step's kind
        on the host, `train_function` is a `host_steps.HostChosenSteps` that
        builds one Keras training function per kind of step."""
        if not self._steps_chosen_on_host():
            return super().make_train_function(force=force)
        if self.train_function is not None and not force:
            return self.train_function
        keras_trainer = super()

        def build(kind):
            chooser = self.train_function
            # Keras (TensorFlow, JAX) compiles the `train_step` it reads now:
            # give it this kind's, so each compiled function traces its own
            # kind whenever it traces (a new batch shape, say).
            object.__setattr__(self, "train_step", self.train_step_of_kind(kind))
            try:
                keras_trainer.make_train_function(force=True)
            finally:
                object.__delattr__(self, "train_step")
            function, self.train_function = self.train_function, chooser
            return function

        # Every kind this fit can take, built now: under a keras.distribution
        # Keras reads the variables' shardings when it builds a function, and
        # during an epoch the JAX trainer has purged the variables.
        per_call = self.steps_per_execution
        epochs = [None] + ([0] if self.sam_start_epoch > 0 else [])
        kinds = {self._host_step_kind(s, e, per_call) for s in (0, 1) for e in epochs}
        self.train_function = host_steps.HostChosenSteps(self, build, kinds)
        return self.train_function

    MEAN_REDUCTIONS = ("sum_over_batch_size", "mean")
    """Loss reductions under which a batch's gradient is the size-weighted
    mean of its parts' (what the noise scale estimate compares)."""

    def _check_mean_reduced_loss(self):
        losses = [loss for loss in tree.flatten(getattr(self, "loss", None)) if loss is not None]
        for loss in losses:
            reduction = getattr(loss, "reduction", "sum_over_batch_size")
            if reduction not in self.MEAN_REDUCTIONS:
                raise ValueError(
                    f"`noise_scale=True` needs a mean-reduced loss (the gradient of a "
                    f"batch the mean of its parts'); {type(loss).__name__} has "
                    f"reduction={reduction!r}. Use reduction='sum_over_batch_size' (the "
                    "default), or noise_scale=False."
                )

    def _check_per_replica_perturbation(self):
        """Per-replica perturbation needs a step per device: refused (before
        any step) under a JAX `ModelParallel` mesh whose batch axis spans
        several devices, where the step runs on global arrays."""
        if self.sync_perturbation or type(self)._sam_step is not StepEngine._sam_step:
            return  # one global perturbation, or none computed from the batch
        count = getattr(sam_backend, "batch_devices_without_per_device_step", lambda: 1)()
        if count > 1:
            raise ValueError(
                f"{type(self).__name__} perturbs per replica by default (each "
                "device with the gradient of its own batch shard), which needs "
                "one step per device: keras.distribution.DataParallel gives it, "
                f"but this distribution ({type(keras.distribution.distribution()).__name__}) "
                f"splits the batch over {count} devices of a mesh that also shards "
                "the weights. Pass `sync_perturbation=True` (one perturbation from "
                "the global batch's gradient, the same on every device), with "
                "`num_batch_splits` too for m-sharpness within the global batch."
            )

    def _replicas_for_splits(self):
        """Replicas that each split their own slice of the global batch."""
        strategy = getattr(self, "distribute_strategy", None)  # TF only
        if strategy is not None:
            return getattr(strategy, "num_replicas_in_sync", 1)
        if not self.sync_perturbation and hasattr(sam_backend, "per_device_count"):
            return sam_backend.per_device_count()  # JAX DataParallel
        return 1

    def _before_fit(self):
        """Hook run by `fit` before any step (GSAMModel reads its lr range)."""

    def _loss_and_state(self, weights, state, metrics_state, x, y, sample_weight, extra_loss=None):
        """One stateless forward pass in training mode at `weights`, `state`.

        `extra_loss(y_pred)`, when given, is a batch-mean term added to the
        compiled loss (MESA's distillation term).

        Returns `(scaled_loss, (loss, y_pred, new_state, new_metrics_state))`.
        """
        mapping = list(zip(self.trainable_variables, weights))
        mapping += list(zip(self.non_trainable_variables, state))
        mapping += list(zip(self.metrics_variables, metrics_state))
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            y_pred = self(x, training=True)
            loss = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            if extra_loss is not None:
                loss = loss + sam_backend.keras_loss_share(extra_loss(y_pred))
        loss = sam_backend.replica_loss(loss)
        new_state = [scope.get_current_value(v) for v in self.non_trainable_variables]
        # compute_loss updates the per-output loss metrics of a loss dict.
        new_metrics = [scope.get_current_value(v) for v in self.metrics_variables]
        scaled = self.optimizer.scale_loss(loss) if self.optimizer else loss
        return scaled, (loss, y_pred, new_state, new_metrics)

    def _gradient_pass(self, grad_fn, halves, weights, state, metrics_state, x, y, sample_weight):
        """One gradient evaluation on the batch: `((loss, y_pred, new_state,
        new_metrics), grads, halves_stats)`.

        With `halves` (the noise scale on one device) the batch is evaluated
        as its two halves, the same work: the gradient and loss are their
        size-weighted means (what a mean-reduced loss of the whole batch
        gives), float state (BatchNorm statistics) the mean of their updates,
        other state (seed counters) and the metrics are carried from the
        first half to the second (so Dropout draws one mask per half, not
        the whole batch's mask the perturbed pass draws). `halves_stats` is
        then `(mean of the halves' ||g||^2, mean of 1 / their sizes)`, else
        None.
        """
        if not halves:
            (_, outputs), grads = grad_fn(weights, state, metrics_state, x, y, sample_weight)
            return outputs, grads, None
        size = _batch_size(x)
        half = size // 2
        is_float = [keras.backend.is_float_dtype(v.dtype) for v in self.non_trainable_variables]
        results, carried, metrics = [], list(state), list(metrics_state)
        for start, stop in ((0, half), (half, size)):

            def cut(t, start=start, stop=stop):
                return None if t is None else tree.map_structure(lambda a: a[start:stop], t)

            begin = [s if f else c for s, c, f in zip(state, carried, is_float)]
            (_, (loss, y_pred, carried, metrics)), grads = grad_fn(
                weights, begin, metrics, cut(x), cut(y), cut(sample_weight)
            )
            results.append((ops.cast(stop - start, "float32"), loss, y_pred, carried, grads))
        (b1, l1, p1, n1, g1), (b2, l2, p2, n2, g2) = results
        s1, s2 = b1 / (b1 + b2), b2 / (b1 + b2)
        grads = [ops.cast(s1, a.dtype) * a + ops.cast(s2, b.dtype) * b for a, b in zip(g1, g2)]
        loss = ops.cast(s1, l1.dtype) * l1 + ops.cast(s2, l2.dtype) * l2
        y_pred = tree.map_structure(lambda a, b: ops.concatenate([a, b], axis=0), p1, p2)
        new_state = [(a + b) / 2 if f else b for a, b, f in zip(n1, n2, is_float)]
        squared = (rules.dot(g1, g1) + rules.dot(g2, g2)) / 2
        # Parts of b1 and b2 examples: E||g_part||^2 = |G|^2 + tr(Sigma) / b,
        # averaged, so the small size is their harmonic mean.
        inverse = (1.0 / ops.maximum(b1, 1.0) + 1.0 / b2) / 2
        static = _static_batch_size(x)
        if static is None or static < 2:
            # A batch of one example (a last partial batch): its empty first
            # half would put NaN into BatchNorm statistics; the second half
            # is the whole batch then (`_noise_terms` leaves the step out).
            two = ops.greater(half, 0)
            grads = [ops.where(two, g, b) for g, b in zip(grads, g2)]
            loss = ops.where(two, loss, l2)
            new_state = [
                ops.where(two, a, b) if f else a for a, b, f in zip(new_state, n2, is_float)
            ]
            squared = ops.where(two, squared, rules.dot(g2, g2))
        return (loss, y_pred, new_state, metrics), grads, (squared, inverse)

    def _sam_step(self, weights, state, metrics_state, x, y, sample_weight, noise=None):
        """Descent gradients and new state for one batch (one replica).

        The clean pass always runs; the perturbed pass only on the steps
        where `_decide` says so (every step by default). A kind of step
        chosen on the host (`keras_sam.models.host_steps`) makes `do_sam` a
        Python bool, and the traced step holds only that kind's passes;
        otherwise (AE-SAM, several steps per call) the second pass runs
        inside one compiled conditional. Before `sam_start_epoch` the step
        is Keras' own (see `_keras_plain_step`), unless the noise scale is
        measured, which this step does with the clean pass alone.

        The hooks get `summed(*names)`: this step's `"clean"` and/or
        `"perturbed"` gradients summed over the replicas, one list per name.
        Each is all-reduced at most once per step (the clean one is `ascent`
        with `sync_perturbation=True`), those not reduced yet in one
        collective; `"perturbed"` exists once the second pass has run, i.e.
        in `_after_sam` and `_plain_descent`.
        """
        grad_fn = sam_backend.value_and_grad(self._loss_and_state)
        replicas = sam_backend.num_replicas()

        random_state = sam_backend.random_state()
        halves = noise == "step" and replicas == 1
        (loss, y_pred, new_state, new_metrics), grads, halves_stats = self._gradient_pass(
            grad_fn, halves, weights, state, metrics_state, x, y, sample_weight
        )
        local, reduced = {"clean": grads}, {}
        ascent = grads
        if self.sync_perturbation and replicas > 1:
            ascent = reduced["clean"] = sam_backend.all_reduce(grads, "sum")

        def summed(*names):
            missing = [n for n in names if n not in reduced]
            if missing:
                flat = sam_backend.all_reduce([g for n in missing for g in local[n]], "sum")
                for n in missing:
                    reduced[n], flat = flat[: len(local[n])], flat[len(local[n]) :]
            return [reduced[n] for n in names]

        positions = self._own_state_positions()
        own = [state[i] for i in positions]
        plain = self._host_steps.kind == host_steps.PLAIN  # before sam_start_epoch
        do_sam, own = (False, own) if plain else self._decide(grads, own, summed)
        noise_stats = {}
        if noise is not None:
            if halves:
                squared, inverse = halves_stats
            else:
                squared = rules.dot(grads, grads)
                inverse = 1.0 / ops.cast(_batch_size(x), "float32")
            noise_stats = dict(noise_small=squared, noise_inverse=inverse)
        if noise == "step":  # the whole batch: its parts are the halves or the replicas
            (global_grads,) = summed("clean") if replicas > 1 else (grads,)
            noise_stats.update(
                noise_large=rules.dot(global_grads, global_grads),
                noise_parts=ops.convert_to_tensor(2.0 if halves else 1.0),
            )
        elif noise == "part":  # one sub-batch: `_step_on_batch` combines them
            noise_stats.update(noise_clean=list(grads))

        # Only the second gradient evaluation is conditional: collectives
        # (all-reduce under MirroredStrategy) cannot run inside a branch.
        def second_pass():
            rho = self.current_rho()
            e = self._perturbation(ascent, weights, rho)
            sam_backend.set_random_state(random_state)  # the same dropout mask
            # The whole batch (with the halves of the noise scale too: the
            # descent gradient is the one SAM defines).
            (loss_adv, _, _, _), perturbed, _ = self._gradient_pass(
                grad_fn,
                False,
                [w + ei for w, ei in zip(weights, e)],
                state,
                metrics_state,
                x,
                y,
                sample_weight,
            )
            sharpness = ops.cast((loss_adv - loss) * replicas, "float32")
            return list(perturbed), sharpness, ops.cast(rho, "float32")

        def no_second_pass():
            zero = ops.zeros((), "float32")
            return list(grads), zero, zero

        if do_sam is True:
            perturbed, sharpness, rho = second_pass()
        elif do_sam is False:
            perturbed, sharpness, rho = no_second_pass()
        else:
            perturbed, sharpness, rho = ops.cond(do_sam, second_pass, no_second_pass)
        local["perturbed"] = perturbed
        if plain:
            descent = list(grads)
        elif do_sam is False:  # a step between SAM steps, decided when traced
            descent = self._plain_descent(grads, own, summed)
        elif self.sync_perturbation and replicas > 1 and self._descent_uses_clean_gradient:
            # The combination needs the global gradients; every replica
            # computes the same global direction and hands apply() its share.
            (gp_all,) = summed("perturbed")
            descent = [d / replicas for d in self._descent(ascent, gp_all)]
        else:
            descent = self._descent(grads, perturbed)
        if do_sam is True:
            own = self._after_sam(grads, perturbed, own, summed)
        elif do_sam is not False:
            sam_own = self._after_sam(grads, perturbed, own, summed)
            between = self._plain_descent(grads, own, summed)
            descent = [ops.where(do_sam, d, b) for d, b in zip(descent, between)]
            own = [ops.where(do_sam, n, o) for n, o in zip(sam_own, own)]
        for i, value in zip(positions, own):
            new_state[i] = value
        grad_norm = rules.global_norm(ascent)
        if not self.sync_perturbation:
            grad_norm = grad_norm * replicas
        stats = dict(
            loss=ops.cast(loss, "float32"),
            sharpness=sharpness,
            grad_norm=ops.cast(grad_norm / self._loss_scale(), "float32"),
            rho=rho,
            sam_step=ops.cast(do_sam, "float32"),
            **noise_stats,
        )
        return descent, new_state, new_metrics, stats, y_pred

    # --------------------------------------------- when to take a SAM step
    def _own_state_variables(self):
        """The wrapper's own state kept across steps (LookSAM's direction,
        AE-SAM's statistics): non-trainable variables, saved with the model."""
        return []

    def _own_state_positions(self):
        index = {id(v): i for i, v in enumerate(self.non_trainable_variables)}
        return [index[id(v)] for v in self._own_state_variables()]

    def _decide(self, grads, own, summed):
        """`(do_sam, own)`: whether this step is a SAM step (True, False, or
        a boolean scalar tensor, the same on every replica) and the updated
        own state. `summed("clean")` is the global clean gradient (see
        `_sam_step`). A kind chosen on the host is a Python bool here, so the
        traced step holds no conditional."""
        kind = self._host_steps.kind
        if kind is not host_steps.IN_STEP:
            return kind == host_steps.SAM, own
        if self.sam_every == 1:
            return True, own
        iteration = ops.convert_to_tensor(self.optimizer.iterations)
        return ops.equal(ops.mod(iteration, self.sam_every), 0), own

    def _after_sam(self, grads, perturbed, own, summed):
        """Own state after a SAM step (`summed`: see `_sam_step`)."""
        return list(own)

    def _after_apply(self, trainable, state):
        """The non-trainable state after the optimizer moved the weights to
        `trainable` (MESA's moving average); unchanged by default."""
        return state

    def _plain_descent(self, grads, own, summed):
        """The descent gradient of a plain step: the clean gradient
        (`summed`: see `_sam_step`)."""
        return list(grads)

    def _loss_scale(self):
        scale = getattr(self.optimizer, "dynamic_scale", None)
        return 1.0 if scale is None else ops.cast(scale, "float32")

    def _step_on_batch(self, weights, state, metrics_state, x, y, sample_weight):
        """Runs `_sam_step` on the whole batch or on its sub-batches.

        With sub-batches each gets its own perturbation and the descent
        gradients are averaged; floating-point state (BatchNorm statistics)
        becomes the mean of the sub-batches' updates (for BatchNorm: one
        update with the mean of the sub-batch statistics), other state (seed
        counters) and the metrics are carried from one sub-batch to the next.

        Returns `(descent, new_state, new_metrics, stats, y_pred)`.
        """
        n = self._splits_in_step(x)
        if isinstance(n, int) and n == 1:
            noise = {"noise": "step"} if self.noise_scale else {}
            descent, new_state, metrics, stats, y_pred = self._sam_step(
                weights, state, metrics_state, x, y, sample_weight, **noise
            )
            if self.noise_scale:
                parts = stats.pop("noise_parts") * sam_backend.num_replicas()
                stats.update(self._noise_terms(stats, parts, x))
            return descent, new_state, metrics, stats, y_pred
        noise = {"noise": "part"} if self.noise_scale else {}
        size = _batch_size(x)
        is_float = [keras.backend.is_float_dtype(v.dtype) for v in self.non_trainable_variables]

        def part(t, i):
            return (
                None
                if t is None
                else tree.map_structure(lambda a: a[i * size // n : (i + 1) * size // n], t)
            )

        def body(i, carry):
            descent_sum, state_sum, carried, metrics, stats_sum = carry
            start = [s if f else c for s, c, f in zip(state, carried, is_float)]
            descent, new_state, metrics, stats, y_pred = self._sam_step(
                weights, start, metrics, part(x, i), part(y, i), part(sample_weight, i), **noise
            )
            carry = (
                [a + b for a, b in zip(descent_sum, descent)],
                [a + b if f else a for a, b, f in zip(state_sum, new_state, is_float)],
                new_state,
                metrics,
                tree.map_structure(lambda a, b: a + b, stats_sum, stats),
            )
            return carry, y_pred

        zero = ops.zeros((), "float32")
        carry = (
            [ops.zeros_like(w) for w in weights],
            [ops.zeros_like(s) if f else s for s, f in zip(state, is_float)],
            list(state),
            list(metrics_state),
            dict(loss=zero, sharpness=zero, grad_norm=zero, rho=zero, sam_step=zero),
        )
        if self.noise_scale:
            carry[-1].update(
                noise_small=zero,
                noise_inverse=zero,
                noise_clean=[ops.zeros_like(w) for w in weights],
            )
        carry, y_pred = sam_backend.loop_over(n, body, carry)
        descent_sum, state_sum, carried, metrics, stats_sum = carry

        def mean(t):
            return t / ops.cast(n, t.dtype)

        new_state = [mean(s) if f else c for s, c, f in zip(state_sum, carried, is_float)]
        stats = tree.map_structure(mean, stats_sum)
        if self.noise_scale:
            # The parts: the sub-batches of every replica, all at `w`.
            clean = sam_backend.all_reduce(stats.pop("noise_clean"), "sum")
            stats["noise_large"] = rules.dot(clean, clean)
            parts = ops.cast(n, "float32") * sam_backend.num_replicas()
            stats.update(self._noise_terms(stats, parts, x))
        return [mean(d) for d in descent_sum], new_state, metrics, stats, y_pred

    def _noise_terms(self, stats, parts, x):
        """This step's estimates of `|G|^2` and `tr(Sigma)` (`noise_sq`,
        `noise_trace`, the same on every replica) from `stats["noise_small"]`,
        the replica's mean of `||g_part||^2`, `stats["noise_inverse"]`, its
        mean of `1 / part size`, and `stats["noise_large"]`, `||g||^2` of the
        global clean gradient, both norms in the step's units (the loss
        scale, each replica's loss a `1 / replicas` share). A step whose
        replicas hold batches of different sizes (a last partial batch) is
        left out on every replica alike."""
        replicas = sam_backend.num_replicas()
        unit = ops.cast(replicas, "float32") / self._loss_scale()
        local = ops.cast(_batch_size(x), "float32")
        small, inverse, batch = sam_backend.all_reduce(
            [
                ops.cast(stats.pop("noise_small"), "float32") / replicas,
                ops.cast(stats.pop("noise_inverse"), "float32") / replicas,
                local,
            ],
            "sum",
        )
        (spread,) = sam_backend.all_reduce([ops.abs(local - batch / replicas)], "sum")
        small = small * unit**2  # each part's own mean gradient
        large = ops.cast(stats.pop("noise_large"), "float32") / self._loss_scale() ** 2
        squared, trace = rules.noise_scale_terms(small, large, 1.0 / inverse, batch)
        equal = ops.less(spread, 0.5)  # integer sizes: all equal
        # Two parts at least, each of one example at least, the replicas'
        # batches of one size, finite estimates.
        valid = ops.all(
            ops.stack(
                [
                    ops.greater_equal(parts, 2.0),
                    ops.greater_equal(batch, parts),
                    equal,
                    ops.all(ops.isfinite(ops.stack([squared, trace]))),
                ]
            )
        )
        return dict(noise_sq=squared, noise_trace=trace, noise_valid=ops.cast(valid, "float32"))

    def _with_noise_average(self, state, new_state, stats):
        """`(new_state, noise_scale)`: the moving averages moved by this step's
        estimates (a step whose parts hold less than one example, or whose
        estimates are not finite, leaves them), and the noise scale they give
        (`rules.noise_scale`; the averages' zero start cancels in the ratio)."""
        index = [id(v) for v in self.non_trainable_variables].index(id(self._noise_average))
        old = state[index]
        terms = ops.stack([stats.pop("noise_sq"), stats.pop("noise_trace")])
        moved = rules.ema_update([old[:2]], [terms], self.noise_scale_decay)[0]
        valid = ops.greater(stats.pop("noise_valid"), 0.5)
        average = ops.where(valid, ops.concatenate([moved, old[2:] + 1.0]), old)
        new_state = list(new_state)
        new_state[index] = average
        # NaN until a step has measured (AdaptiveBatchSize then keeps the batch).
        measured = rules.noise_scale(average[0], average[1])
        return new_state, ops.where(ops.greater(average[2], 0), measured, float("nan"))

    def _apply(self, descent, variables):
        """`optimizer.apply(descent)`; returns whether the step was taken (a
        boolean tensor under a LossScaleOptimizer, else None)."""
        if not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            self.optimizer.apply(descent, variables)
            return None
        if sam_backend.num_replicas() > 1:
            # Keras' LossScaleOptimizer checks only the first replica's
            # gradients for inf/NaN; make every replica see all of them.
            # apply() sums across replicas, so the update is unchanged.
            descent = sam_backend.all_reduce(descent, "mean")
        self.optimizer.apply(descent, variables)
        return rules.all_finite(descent)

    def _keras_plain_step(self):
        """Whether this step is Keras' own `train_step`: the plain steps
        before `sam_start_epoch`, except with `noise_scale` (the engine's
        plain step measures it) and under a LossScaleOptimizer (the engine's
        step skips a non-finite step on every replica and leaves BatchNorm
        statistics unchanged then). `grad_norm` is not measured there: it is
        logged as NaN (`sharpness` and `rho`, averaged over SAM steps, as 0)."""
        return (
            self._host_steps.kind == host_steps.PLAIN
            and not self.noise_scale
            and not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        )

    def _stateful_train_step(self, data):
        """`train_step` for TensorFlow and PyTorch: variables updated in place."""
        if self._keras_plain_step():
            self._grad_norm_tracker.update_state(float("nan"))  # not measured
            return super().train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        trainable = self.trainable_variables
        non_trainable = self.non_trainable_variables
        state = sam_backend.read_values(non_trainable)
        descent, new_state, new_metrics, stats, y_pred = self._step_on_batch(
            sam_backend.read_values(trainable),
            state,
            sam_backend.read_values(self.metrics_variables),
            x,
            y,
            sample_weight,
        )
        if self.noise_scale:
            new_state, noise_scale = self._with_noise_average(state, new_state, stats)
        with sam_backend.no_grad():
            finite = self._apply(descent, trainable)
            new_state = self._after_apply(sam_backend.read_values(trainable), new_state)
            if finite is not None:  # a skipped step changes no state
                new_state = [ops.where(finite, n, o) for n, o in zip(new_state, state)]
            for v, value in zip(non_trainable, new_state):
                v.assign(value)
            for v, value in zip(self.metrics_variables, new_metrics):
                v.assign(value)
        self._track(x, stats)
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if self.noise_scale:
            logs["noise_scale"] = noise_scale
        return logs

    def _stateless_train_step(self, state, data):
        """`train_step` for JAX: state in, state out (see Keras' JAX trainer)."""
        if self._keras_plain_step():
            logs, state = super().train_step(state, data)
            *others, metrics_vars = state
            mapping = list(zip(self.metrics_variables, metrics_vars))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                self._grad_norm_tracker.update_state(float("nan"))  # not measured
                logs = dict(logs, grad_norm=self._grad_norm_tracker.result())
            metrics_vars = [scope.get_current_value(v) for v in self.metrics_variables]
            return logs, (*others, metrics_vars)
        trainable, non_trainable, optimizer_vars, metrics_vars = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        mesh = None if self.sync_perturbation else sam_backend.per_device_mesh()
        if mesh is None:
            mapping = list(zip(self.optimizer.variables, optimizer_vars))
            with keras.StatelessScope(state_mapping=mapping):
                descent, new_state, metrics_vars, stats, y_pred = self._step_on_batch(
                    trainable, non_trainable, metrics_vars, x, y, sample_weight
                )
        else:
            descent, new_state, metrics_vars, stats, y_pred = self._step_per_device(
                mesh, state, (x, y, sample_weight)
            )
        if self.noise_scale:
            new_state, noise_scale = self._with_noise_average(non_trainable, new_state, stats)
        new_trainable, optimizer_vars = self.optimizer.stateless_apply(
            optimizer_vars, descent, trainable
        )
        new_state = self._after_apply(new_trainable, new_state)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            finite = rules.all_finite(descent)  # a skipped step changes no state
            new_state = [ops.where(finite, n, o) for n, o in zip(new_state, non_trainable)]
        mapping = list(zip(self.metrics_variables, metrics_vars))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self._track(x, stats)
            logs = self.compute_metrics(x, y, y_pred, sample_weight)
        if self.noise_scale:
            logs["noise_scale"] = noise_scale
        metrics_vars = [scope.get_current_value(v) for v in self.metrics_variables]
        return logs, (new_trainable, new_state, optimizer_vars, metrics_vars)

    def _step_per_device(self, mesh_and_axis, state, data):
        """`_step_on_batch` on every device's shard of the batch (JAX under
        `DataParallel`): each device perturbs with its own gradient, and the
        descent gradients, state and metrics are combined across devices as
        MirroredStrategy combines replicas."""
        is_float = [keras.backend.is_float_dtype(v.dtype) for v in self.non_trainable_variables]

        def local(state, data):
            trainable, non_trainable, optimizer_vars, metrics_vars = state
            mapping = list(zip(self.optimizer.variables, optimizer_vars))
            with keras.StatelessScope(state_mapping=mapping):
                descent, new_state, new_metrics, stats, y_pred = self._step_on_batch(
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

    def _stateful_test_step(self, data):
        return _without_training_statistics(super().test_step(data))

    def _stateless_test_step(self, state, data):
        logs, state = super().test_step(state, data)
        return _without_training_statistics(logs), state

    if keras.backend.backend() == "jax":
        train_step = _stateless_train_step
        test_step = _stateless_test_step
    else:
        train_step = _stateful_train_step
        test_step = _stateful_test_step

    def _track(self, x, stats):
        replicas = sam_backend.num_replicas()
        self._loss_tracker.update_state(stats["loss"] * replicas, sample_weight=_batch_size(x))
        # sharpness and rho exist on SAM steps only.
        if self._sharpness_tracker is not None:
            self._sharpness_tracker.update_state(
                stats["sharpness"], sample_weight=stats["sam_step"]
            )
        if self._rho_tracker is not None:
            self._rho_tracker.update_state(stats["rho"], sample_weight=stats["sam_step"])
        self._grad_norm_tracker.update_state(stats["grad_norm"])
        if self._sam_fraction_tracker is not None:
            self._sam_fraction_tracker.update_state(stats["sam_step"])


def _without_training_statistics(logs):
    return {k: v for k, v in logs.items() if k not in TRAINING_STATISTICS}
