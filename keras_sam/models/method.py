"""The contract of a sharpness-aware method: what a subclass writes.

A two-gradient method (SAM, ASAM, GSAM, LookSAM, AE-SAM) subclasses
`TwoGradientModel` and writes, as a Keras optimizer writes `update_step`:

- `perturbation(gradients, variables, rho)`: the offsets `e` of the weights
  for the second gradient (required);
- `descent(gradients, perturbed_gradients)`: the gradients the optimizer
  applies (default: the perturbed ones);
- `__init__` / `get_config`: its hyperparameters, as any Keras object;
- `build_state()`: its named state (`self.add_state(...)`), if any, made
  when the wrapper builds.

Which kind of step runs (every `sam_every` steps, from `sam_start_epoch`)
is the engine's. Optional places, each for one shipped method:
`current_rho()` (the radius, GSAM's follows the learning rate),
`should_perturb(gradients, state)` (a decision from the data, AE-SAM),
`update_state(state, gradients, perturbed_gradients)` and
`between_descent(gradients, state)` (LookSAM's stored direction and its
reuse between SAM steps).

A one-gradient method (Momentum-SAM, RWP, Flat-LoRA, MESA) subclasses
`OneGradientModel` and writes `perturbation(weights, non_trainable, rho)`;
optional places: `loss_term` (MESA's distillation), `after_apply` (MESA's
moving average), `descent` with `uses_clean_gradient` (m-RWP).
"""

import keras
from keras import ops

from keras_sam import _validation
from keras_sam import backend as sam_backend
from keras_sam import rules
from keras_sam.models import _replicas
from keras_sam.models import host_steps
from keras_sam.models._noise import NoiseScale
from keras_sam.models._passes import SubBatches
from keras_sam.models._state import NamedState
from keras_sam.models._train_steps import StepParts
from keras_sam.models.engine import StepEngine


def _overrides(model, name):
    """Whether `model`'s method defines the optional hook `name`."""
    return getattr(type(model), name) is not getattr(TwoGradientModel, name)


class TwoGradientModel(StepEngine):
    """Base of the methods whose SAM step takes two gradients: the clean one
    at `w` and the perturbed one at `w + e`, from the same starting state
    (BatchNorm statistics, dropout masks), in training mode.

    Args:
        model: the `keras.Model` to train, built.
        **kwargs: the step's keywords, as `SAMModel` documents them
            (`sync_perturbation`, `num_batch_splits`, `sub_batch_size`,
            `sam_every`, `sam_start_epoch`, `noise_scale`,
            `noise_scale_decay`), and `keras.Model`'s (e.g. `name`).
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
        self.sync_perturbation = bool(sync_perturbation)
        self._sub_batches = SubBatches(num_batch_splits, sub_batch_size)
        data_driven = _overrides(self, "should_perturb")
        self._chooser = host_steps.StepChooser(sam_every, sam_start_epoch, data_driven)
        self.noise_scale = _validation.one_of("noise_scale", noise_scale, (False, True))
        self._noise = NoiseScale(noise_scale_decay)
        super().__init__(model, **kwargs)

    # ------------------------------------------------------ the contract
    def perturbation(self, gradients, variables, rho):
        """The offsets `e`: the second gradient is taken at `variables + e`.

        Args:
            gradients: the clean gradients at `variables` (this replica's, or
                the global batch's with `sync_perturbation=True`), one per
                trainable variable.
            variables: the values of the trainable variables.
            rho: `current_rho()`.

        Returns:
            A list of offsets, one per trainable variable.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must define `perturbation(gradients, variables, rho)`."
        )

    def descent(self, gradients, perturbed_gradients):
        """The gradients the optimizer applies at `w` (default: the perturbed
        ones). A method that defines it combines the two; under
        `sync_perturbation=True` it then gets the global gradients."""
        return list(perturbed_gradients)

    def should_perturb(self, gradients, state):
        """`(take_sam_step, state)` from the data, for a method that decides
        itself (AE-SAM): a boolean scalar tensor and the new named state.
        `gradients` is the global clean gradient."""
        raise NotImplementedError

    def update_state(self, state, gradients, perturbed_gradients):
        """The named state after a SAM step (global gradients); unchanged by default."""
        return state

    def between_descent(self, gradients, state):
        """The descent direction of a step between SAM steps from the global
        clean gradient (default: the clean gradient itself)."""
        return list(gradients)

    # ------------------------------------------------------- the engine's
    # The settings, read from the rooms that hold them.
    num_batch_splits = property(lambda self: self._sub_batches.num_batch_splits)
    sub_batch_size = property(lambda self: self._sub_batches.sub_batch_size)
    sam_every = property(lambda self: self._chooser.sam_every)
    sam_start_epoch = property(lambda self: self._chooser.sam_start_epoch)
    noise_scale_decay = property(lambda self: self._noise.decay)

    def get_config(self):
        config = super().get_config()
        config.update(
            sync_perturbation=self.sync_perturbation,
            num_batch_splits=self.num_batch_splits,
            sub_batch_size=self.sub_batch_size,
            sam_every=self.sam_every,
            sam_start_epoch=self.sam_start_epoch,
            noise_scale=self.noise_scale,
            noise_scale_decay=self.noise_scale_decay,
        )
        return config

    def _build_state(self):
        self.build_state()
        if self.noise_scale:  # after the method's (the order files hold them in)
            self._noise.build(self)

    def _switches_steps(self):
        return self._chooser.switches()

    def num_splits(self, batch_size):
        """Sub-batches per replica for a per-replica batch of `batch_size`.

        Raises:
            ValueError: if `num_batch_splits` / `sub_batch_size` does not
                divide `batch_size`.
        """
        return self._sub_batches.count(batch_size)

    def _before_fit(self, bound):
        if not self.sync_perturbation:
            _replicas.check_per_replica_perturbation(type(self).__name__)
        if self.noise_scale:
            NoiseScale.check_loss(getattr(self, "loss", None))
        replicas = _replicas.per_replica_batches(self, self.sync_perturbation)
        return self._sub_batches.check_first_batch(bound.arguments, replicas)

    def _fit_warnings(self, bound):
        message = self._chooser.no_sam_step(type(self).__name__, bound.arguments.get("epochs", 1))
        return [message] if message else []

    def host_step_kind(self, step, epoch=None):
        if not self._chooser.on_host(self.optimizer):
            return None
        return self._chooser.kind_at(step, epoch, 1, self.optimizer)

    def _fit_callbacks(self):
        return [self._chooser.clock] if self._chooser.on_host(self.optimizer) else []

    def _run_fit(self, fit, bound):
        outer = self._chooser.clock.state()  # a fit called from a callback of another fit
        try:
            return super()._run_fit(fit, bound)
        finally:
            self._chooser.clock.set_state(outer)

    def train_step_of_kind(self, kind):
        """`train_step` for one kind of step (`keras_sam.models.host_steps`)."""
        return self._chooser.train_step_of_kind(type(self).train_step.__get__(self), kind)

    def make_train_function(self, force=False):
        """Keras' `make_train_function`; where `fit` chooses each step's kind
        on the host, a `host_steps.HostChosenSteps` of one Keras training
        function per kind."""
        if not self._chooser.on_host(self.optimizer):
            return super().make_train_function(force=force)
        if self.train_function is None or force:
            self.train_function = self._chooser.train_function(self, super().make_train_function)
        return self.train_function

    def _step_parts(self):
        keras_step = (
            self._chooser.kind == host_steps.PLAIN
            and not self.noise_scale
            and not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        )
        mesh = None
        if not self.sync_perturbation:
            mesh = getattr(sam_backend, "per_device_mesh", lambda: None)()
        return StepParts(
            self._step_on_batch, self._after_step, lambda t, s: s, keras_step, mesh, self._track
        )

    def _step_on_batch(self, weights, state, metrics_state, x, y, sample_weight):
        """`_sam_step` on the whole batch or on each of its sub-batches."""
        synced = self.sync_perturbation and sam_backend.num_replicas() > 1
        noise = self._noise if self.noise_scale else None
        return self._sub_batches.step(
            self._sam_step,
            noise,
            self._passes.float_state(),
            synced,
            _replicas.loss_scale(self.optimizer),
            weights,
            state,
            metrics_state,
            x,
            y,
            sample_weight,
        )

    def _after_step(self, state, new_state, stats):
        if not self.noise_scale:
            return new_state, {}
        return self._noise.after_step(self, state, new_state, stats)

    def _takes_second_pass(self):
        """False where the second gradient is known to be the first (SAMModel at rho=0)."""
        return True

    def _sam_step(self, weights, state, metrics_state, x, y, sample_weight, noise=None):
        """Descent gradients and new state for one batch (one replica).

        The clean pass always runs; the perturbed pass where the step is a
        SAM step. A kind chosen on the host makes `do_sam` a Python bool and
        the traced step holds that kind's passes only; otherwise (AE-SAM,
        several steps per call) the second pass runs inside one compiled
        conditional. Each gradient is all-reduced at most once per step
        (`summed`), those not reduced yet in one collective.
        """
        passes = self._passes
        replicas = sam_backend.num_replicas()
        random_state = sam_backend.random_state()
        halves_stats = None
        if noise == "step" and replicas == 1:
            outputs, grads, halves_stats = passes.gradient_of_halves(
                weights, state, metrics_state, x, y, sample_weight
            )
        else:
            outputs, grads = passes.gradient(weights, state, metrics_state, x, y, sample_weight)
        loss, y_pred, new_state, new_metrics = outputs
        summed = _replicas.ReplicaSums({"clean": grads})
        ascent = grads
        if self.sync_perturbation and replicas > 1:
            ascent = summed.reduced["clean"] = sam_backend.all_reduce(grads, "sum")

        positions = self._named_state.positions(self)
        own = NamedState.read(positions, state)
        plain = self._chooser.kind == host_steps.PLAIN  # before sam_start_epoch
        if plain:
            do_sam = False
        elif self._chooser.decides_from_data:
            do_sam, own = self.should_perturb(summed("clean")[0], own)
        elif not self._takes_second_pass():
            do_sam = False
        else:
            do_sam = self._chooser.in_step(self.optimizer)
        noise_stats = NoiseScale.part_statistics(noise, grads, halves_stats, x, summed)

        # Only the second gradient evaluation is conditional: collectives
        # (all-reduce under MirroredStrategy) cannot run inside a branch.
        def second_pass():
            rho = self.current_rho()
            e = self.perturbation(ascent, weights, rho)
            sam_backend.set_random_state(random_state)  # the same dropout mask
            perturbed_weights = [w + ei for w, ei in zip(weights, e)]
            (loss_adv, _, _, _), perturbed = passes.gradient(
                perturbed_weights, state, metrics_state, x, y, sample_weight
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
        summed.local["perturbed"] = perturbed
        if plain:
            descent = list(grads)
        elif do_sam is False:  # a step between SAM steps, decided when traced
            descent = self._between(grads, own, summed)
        elif self.sync_perturbation and replicas > 1 and _overrides(self, "descent"):
            # The combination needs the global gradients; every replica
            # computes the same global direction and hands apply() its share.
            (gp_all,) = summed("perturbed")
            descent = [d / replicas for d in self.descent(ascent, gp_all)]
        else:
            descent = self.descent(grads, perturbed)
        if do_sam is True:
            own = self._updated(own, summed)
        elif do_sam is not False:
            sam_own = self._updated(own, summed)
            between = self._between(grads, own, summed)
            descent = [ops.where(do_sam, d, b) for d, b in zip(descent, between)]
            own = keras.tree.map_structure(lambda n, o: ops.where(do_sam, n, o), sam_own, own)
        new_state = NamedState.write(positions, new_state, own)
        grad_norm = rules.global_norm(ascent) * (1 if self.sync_perturbation else replicas)
        stats = dict(
            loss=ops.cast(loss, "float32"),
            sharpness=sharpness,
            grad_norm=ops.cast(grad_norm / _replicas.loss_scale(self.optimizer), "float32"),
            rho=rho,
            sam_step=ops.cast(do_sam, "float32"),
            **noise_stats,
        )
        return descent, new_state, new_metrics, stats, y_pred

    def _updated(self, own, summed):
        if not _overrides(self, "update_state"):
            return dict(own)
        return self.update_state(own, *summed("clean", "perturbed"))

    def _between(self, grads, own, summed):
        """This replica's share of `between_descent` of the global gradient."""
        if not _overrides(self, "between_descent"):
            return list(grads)
        replicas = sam_backend.num_replicas()
        (g,) = summed("clean")
        d = self.between_descent(g, own)
        return [gi + (di - g_all) / replicas for gi, di, g_all in zip(grads, d, g)]


TWO_GRADIENT_KEYWORDS = (
    "adaptive",
    "eta",
    "adaptive_scope",
    "sync_perturbation",
    "num_batch_splits",
    "sub_batch_size",
    "sam_every",
    "sam_start_epoch",
    "noise_scale",
    "noise_scale_decay",
)
"""`SAMModel` keywords that mean nothing to a one-gradient method."""


class OneGradientModel(StepEngine):
    """Base of the methods that take ONE gradient per step, at weights
    perturbed without a first gradient (along the optimizer's momentum,
    random noise) or of an extended loss, and apply it at `w`.

    Args:
        model: the `keras.Model` to train, built.
        **kwargs: passed to `keras.Model` (e.g. `name`); a keyword of the
            two-gradient methods (`sam_every`, `num_batch_splits`, ...) is a
            ValueError naming it.
    """

    _logged_statistics = ("grad_norm", "rho")
    _takes = "Pass `rho` (and keras.Model keywords such as `name`)."
    """What the class takes, for the error on a two-gradient keyword."""

    def __init__(self, model, **kwargs):
        unknown = sorted(set(kwargs) & set(TWO_GRADIENT_KEYWORDS))
        if unknown:
            raise ValueError(
                f"{type(self).__name__} does not take "
                f"{', '.join(f'`{k}`' for k in unknown)}: it takes one gradient "
                f"per step. {self._takes}"
            )
        super().__init__(model, **kwargs)

    # ------------------------------------------------------ the contract
    def perturbation(self, weights, non_trainable, rho):
        """`(weight_offsets, non_trainable_offsets)`: where the one gradient
        is taken, as offsets of the trainable and of the non-trainable values
        (a list with None entries, or None for no offset). Non-trainable
        values it offsets (Flat-LoRA's frozen kernels) keep their values."""
        return None, None

    sync_perturbation = False
    """Not a keyword (no gradient goes into the perturbation): True runs the
    JAX step on the global batch instead of one step per device, so
    BatchNorm sees the global batch's statistics, as on one device."""

    uses_clean_gradient = False
    """True: the step also evaluates the clean gradient at `w`, and the
    optimizer applies `descent(gradients, clean_gradients)`."""

    def descent(self, gradients, clean_gradients):
        """The applied gradients, with `uses_clean_gradient` (m-RWP)."""
        return list(gradients)

    def loss_term(self, x, weights, non_trainable, state):
        """`(term, state)`: `term(y_pred) -> (value, logs)` adds `value`, a
        batch mean, to the compiled loss and logs `logs` (MESA's
        distillation), or None; the named state after it."""
        return None, state

    def after_apply(self, variables, non_trainable, state):
        """The named state after the optimizer moved the weights to
        `variables` (MESA's moving average); unchanged by default."""
        return state

    # ------------------------------------------------------- the engine's
    def _step_parts(self):
        mesh = None
        if not self.sync_perturbation:
            mesh = getattr(sam_backend, "per_device_mesh", lambda: None)()
        return StepParts(
            self._step_on_batch,
            lambda s, n, stats: (n, {}),
            self._after_apply,
            False,
            mesh,
            self._track,
        )

    def _step_on_batch(self, weights, state, metrics_state, x, y, sample_weight):
        passes = self._passes
        positions = self._named_state.positions(self)
        own = NamedState.read(positions, state)
        rho = self.current_rho()
        random_state = sam_backend.random_state()
        weight_offsets, state_offsets = self.perturbation(weights, state, rho)
        at = _offset(weights, weight_offsets)
        values = _offset(state, state_offsets)
        term, own = self.loss_term(x, weights, state, own)
        extra = None if term is None else (lambda y_pred: term(y_pred)[0])
        (loss, y_pred, new_state, new_metrics), grads = passes.gradient(
            at, values, metrics_state, x, y, sample_weight, extra_loss=extra
        )
        descent = grads
        if self.uses_clean_gradient:
            sam_backend.set_random_state(random_state)  # the same dropout mask
            (loss, y_pred, new_state, new_metrics), clean = passes.gradient(
                weights, state, metrics_state, x, y, sample_weight
            )
            descent = self.descent(grads, clean)
        if state_offsets is not None:  # offset values keep theirs, bitwise
            kept = zip(new_state, state_offsets, state)
            new_state = [s if o is None else old for s, o, old in kept]
        new_state = NamedState.write(positions, new_state, own)
        zero = ops.zeros((), "float32")
        grad_norm = rules.global_norm(grads) * sam_backend.num_replicas()
        stats = dict(
            loss=ops.cast(loss, "float32"),
            sharpness=zero,
            grad_norm=ops.cast(grad_norm / _replicas.loss_scale(self.optimizer), "float32"),
            rho=ops.cast(rho, "float32"),
            sam_step=ops.ones((), "float32"),
        )
        if term is not None:
            stats.update(term(y_pred)[1])
        return descent, new_state, new_metrics, stats, y_pred

    def _after_apply(self, trainable, new_state):
        positions = self._named_state.positions(self)
        if not positions:
            return new_state
        own = self.after_apply(trainable, new_state, NamedState.read(positions, new_state))
        return NamedState.write(positions, new_state, own)


def _offset(values, offsets):
    if offsets is None:
        return values
    return [v if o is None else v + o for v, o in zip(values, offsets)]
