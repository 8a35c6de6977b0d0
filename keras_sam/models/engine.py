"""The `keras.Model` every wrapper of `keras_sam.models` is: the Keras side.

`StepEngine` wraps the user's model: `call`, `build`, saving (LoRA factors
kept), `export`, `fit`'s checks, and Keras' `train_step` / `test_step` /
`make_train_function`. What a step computes is the method's (`method.py`:
`TwoGradientModel`, `OneGradientModel`), from rooms of one concept each:

- `_passes.py`: gradient passes at given weights and state, sub-batches;
- `host_steps.py`: which kind of step runs next, chosen on the host;
- `_replicas.py`: replicas, devices and loss scaling;
- `_noise.py`: the gradient noise scale;
- `_train_steps.py`: the TensorFlow / PyTorch and JAX train steps.
"""

import inspect
import warnings

import keras
from keras import tree

from keras_sam.models import _lora_state
from keras_sam.models import _train_steps
from keras_sam.models._passes import GradientPasses
from keras_sam.models._state import NamedState
from keras_sam.models._train_steps import TRAINING_STATISTICS  # noqa: F401 (public name)


class StepEngine(keras.Model):
    """The Keras model the sharpness-aware wrappers share (subclass it
    through `TwoGradientModel` or `OneGradientModel`).

    Args:
        model: the `keras.Model` to train, built.
        **kwargs: passed to `keras.Model` (e.g. `name`).
    """

    _logged_statistics = ("sharpness", "grad_norm", "rho")
    """The training statistics History gets besides the loss and metrics."""

    def __init__(self, model, **kwargs):
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
        self._saved_lora = None  # LoRA variables read by load_own_variables
        # Plain data: the variables are tracked by add_weight.
        object.__setattr__(self, "_named_state", NamedState())
        super().__init__(**kwargs)
        self.inner = model
        self._passes = GradientPasses(self)
        self._trackers = _train_steps.Trackers(self._logged_statistics, self._switches_steps())
        for name, metric in self._trackers.named():
            setattr(self, f"_{name}_tracker", metric)  # tracked by Keras
        if model.built:
            self.built = True
            self._build_state()

    def _switches_steps(self):
        """Whether some steps are plain (then `sam_fraction` is logged)."""
        return False

    # ----------------------------------------------------------- keras.Model
    def call(self, inputs, training=None):
        return self.inner(inputs, training=training)

    def build(self, input_shape=None):
        if not self.inner.built:
            self.inner.build(input_shape)
        if not self.built:
            self._build_state()
        self.built = True

    def current_rho(self):
        """The radius of this step's perturbation (default: `self.rho`)."""
        return self.rho

    def _build_state(self):
        """Creates the wrapper's own variables."""
        self.build_state()

    def build_state(self):
        """Creates the method's named state (`self.add_state`); none by default."""

    def add_state(self, name, shape=(), dtype="float32", like=None):
        """Creates named state of the method, kept across steps: a
        non-trainable variable of the wrapper, saved with the model.

        Args:
            name: the state's name, the key of the `state` dict the method's
                hooks receive and return.
            shape, dtype: of a single variable (`like=None`).
            like: `"trainable_variables"`: one slot per trainable variable of
                the wrapped model, of its shape and dtype (a list aligned
                with the gradients in the hooks); `"variables"`: one per
                floating-point variable of the wrapped model.
        """
        self._named_state.add(self, name, shape, dtype, like)

    def state_variables(self):
        """`{name: variable or list of variables}`: the method's state, the
        lists aligned with `state_sources(name)`."""
        return self._named_state.variables(self)

    def state_sources(self, name):
        """The variables of the wrapped model that the slots of the list state
        `name` mirror: the current trainable variables (`like=
        "trainable_variables"`), or its float variables (`like="variables"`)."""
        return self._named_state.sources(self, name)

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
        config.update(model=keras.saving.serialize_keras_object(self.inner))
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

    # ------------------------------------------------------------------ fit
    def fit(self, x=None, y=None, batch_size=None, *args, **kwargs):
        """`keras.Model.fit`, with the method's settings checked before the
        first step."""
        from keras_sam._multi_worker import check_not_multi_worker

        check_not_multi_worker(self)  # MultiWorkerMirroredStrategy: clear error
        self._restore_lora()  # after keras.models.load_model
        bound = inspect.signature(keras.Model.fit).bind(self, x, y, batch_size, *args, **kwargs)
        x = self._before_fit(bound)
        if x is not None:
            bound.arguments["x"] = x
        for message in self._fit_warnings(bound):
            warnings.warn(message, stacklevel=2)
        return self._run_fit(super().fit, bound)

    def _before_fit(self, bound):
        """Checks before any step (the bound `fit` arguments); may return a
        replacement for `x` (a generator peeked at)."""

    def _fit_warnings(self, bound):
        """Warnings about the bound `fit` arguments (none by default)."""
        return []

    def host_step_kind(self, step, epoch=None):
        """The kind of the step `fit` takes at optimizer step `step` in
        `epoch` where it chooses each step's kind on the host (one of
        `keras_sam.models.host_steps`' kinds), else None."""
        return None

    def train_step_of_kind(self, kind):
        """`train_step` for one kind of step (`host_step_kind`); the same
        step for every kind by default."""
        return self.train_step

    def _fit_callbacks(self):
        """Callbacks the method runs after the user's in `fit` (the host's
        step clock, MESA's epoch counter)."""
        return []

    def _run_fit(self, fit, bound):
        """Runs `fit` with the method's callbacks last, after the user's
        (after `BackupAndRestore`'s `on_train_begin`, say)."""
        extra = self._fit_callbacks()
        if not extra:
            return fit(*bound.args[1:], **bound.kwargs)
        arguments = bound.arguments
        callbacks = arguments.get("callbacks")
        given = isinstance(callbacks, keras.callbacks.CallbackList)
        if given:
            callbacks.callbacks.extend(extra)
            for callback in extra:
                callback.set_model(self)
        else:
            arguments["callbacks"] = (tree.flatten(callbacks) if callbacks else []) + extra
        try:
            return fit(*bound.args[1:], **bound.kwargs)
        finally:
            if given:
                for callback in extra:
                    callbacks.callbacks.remove(callback)

    # ----------------------------------------------------------- the steps
    def _step_parts(self):
        """The method's `_train_steps.StepParts`."""
        raise NotImplementedError

    def _track(self, x, stats):
        self._trackers.track(self, x, stats)

    def _keras_train_step(self):
        return _train_steps.keras_step_without_grad_norm(
            self, self._trackers.grad_norm, super().train_step
        )

    def _stateful_train_step(self, data):
        """`train_step` for TensorFlow and PyTorch: variables updated in place."""
        return _train_steps.stateful(self, self._step_parts(), data, self._keras_train_step())

    def _stateless_train_step(self, state, data):
        """`train_step` for JAX: state in, state out (see Keras' JAX trainer)."""
        parts = self._step_parts()
        return _train_steps.stateless(self, parts, state, data, self._keras_train_step())

    def _stateful_test_step(self, data):
        return _train_steps.without_training_statistics(super().test_step(data))

    def _stateless_test_step(self, state, data):
        logs, state = super().test_step(state, data)
        return _train_steps.without_training_statistics(logs), state

    if keras.backend.backend() == "jax":
        train_step = _stateless_train_step
        test_step = _stateless_test_step
    else:
        train_step = _stateful_train_step
        test_step = _stateful_test_step
