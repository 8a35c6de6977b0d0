"""MESAModel: sharpness-aware training for (almost) free, by distillation from
an exponential moving average of the weights.

MESA (Du, Zhou, Feng, Tan, Zhou, "Sharpness-Aware Training for Free",
NeurIPS 2022, arXiv 2205.14083; the memory-efficient form of SAF) replaces
SAM's second gradient by a trajectory term: the KL divergence between the
softened outputs of an EMA "teacher" of the weights and those of the model,
`loss = L(w) + lambda * tau^2 * KL(p_ema || p_w)` (`keras_sam.rules.mesa_kl`),
at the cost of one forward pass of the teacher per step.
"""

import keras
from keras import ops

from keras_sam import _validation
from keras_sam import rules
from keras_sam.models.method import OneGradientModel

_PROBABILITY_LOSSES = (
    "sparse_categorical_crossentropy",
    "categorical_crossentropy",
)
"""Loss names whose model outputs are probabilities (`from_logits=False`)."""


@keras.saving.register_keras_serializable(package="keras_sam")
class MESAModel(OneGradientModel):
    """Wraps a classifier so that `fit` trains it with MESA.

    Each step evaluates ONE gradient, of the compiled loss plus
    `kl_weight * temperature^2 * KL(p_teacher || p_model)`, where
    `p = softmax(logits / temperature)` and the teacher is the model at an
    exponential moving average of its weights (BatchNorm statistics
    included), run in inference mode, without gradient. After each optimizer
    step the average moves: `w_ema <- ema_decay * w_ema + (1 - ema_decay) * w`.
    It starts from the weights of the first training step (so weights loaded
    into the model after wrapping count). The term is on in the epochs `e`
    with `kl_start_epoch < e < kl_end_epoch` (0-based, as in the official
    code); before that the step is plain training, and the average still
    moves. `kl_weight=0` is plain Keras training exactly (no teacher pass).

    The average is a set of non-trainable variables of the wrapper, so
    `model.save`, `ModelCheckpoint` and `BackupAndRestore` keep it; so is the
    epoch counter that switches the term on. `ema_weights()` returns the
    average (the paper reports the EMA model's accuracy too).

    Logits: the KL needs the model's logits. With `from_logits=None` (the
    default) it is read from the compiled loss: a `Loss` object with
    `from_logits` (e.g. `SparseCategoricalCrossentropy(from_logits=True)`)
    says so; the names `"sparse_categorical_crossentropy"` and
    `"categorical_crossentropy"` mean probabilities, whose logarithms are
    then the logits (softmax of `log p / tau` is `p^(1/tau)` normalized, the
    same distribution). Other losses need `from_logits` passed. A model with
    several outputs needs `kl_output`, the name of the classification output
    the term applies to. The term is a plain batch mean (no `sample_weight`).

    What is logged: `loss` (the compiled loss plus the term, the objective
    the gradient is of), the metrics, `grad_norm` and `kl` (the term
    without `kl_weight`).

    Args:
        model: the `keras.Model` to train, built.
        kl_weight: the paper's lambda (`--reinforce` in its code), `>= 0`;
            0.8 in its ImageNet recipe (its code's default is 0.3).
        temperature: tau, `> 0` (5 throughout the paper).
        ema_decay: the teacher's decay beta, in `[0, 1)` (0.9998 for
            ImageNet's 5,000 steps per epoch; fewer steps per epoch want a
            smaller decay, e.g. 0.99 for a few hundred).
        kl_start_epoch: the term is on after this epoch (the paper's
            E_start, 5; about 30% of training is its rule of thumb).
        kl_end_epoch: the term is off from this epoch on (None: never).
        from_logits: whether the model outputs logits (None: from the loss).
        kl_output: the output the term applies to, for a model with several.
        **kwargs: passed to `keras.Model` (e.g. `name`).

    Example:

    ```python
    model = keras_sam.MESAModel(inner, kl_weight=0.8, temperature=5.0,
                                ema_decay=0.99, kl_start_epoch=3)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=20)   # history: loss, kl, grad_norm
    ```
    """

    _logged_statistics = ("grad_norm", "kl")
    _takes = (
        "Pass `kl_weight`, `temperature`, `ema_decay`, `kl_start_epoch` (and "
        "keras.Model keywords such as `name`)."
    )

    def __init__(
        self,
        model,
        kl_weight=0.8,
        temperature=5.0,
        ema_decay=0.9998,
        kl_start_epoch=5,
        kl_end_epoch=None,
        from_logits=None,
        kl_output=None,
        **kwargs,
    ):
        kwargs.pop("rho", None)  # in the configs of keras_sam <= 0.4
        self.kl_weight = _validation.real("kl_weight", kl_weight, low=0)
        self.temperature = _validation.real("temperature", temperature, low=0, low_inclusive=False)
        self.ema_decay = _validation.real(
            "ema_decay", ema_decay, low=0, high=1, high_inclusive=False
        )
        self.kl_start_epoch = _validation.integer("kl_start_epoch", kl_start_epoch, low=-1)
        self.kl_end_epoch = _validation.integer(
            "kl_end_epoch", kl_end_epoch, low=0, allow_none=True
        )
        if from_logits is not None and not isinstance(from_logits, bool):
            raise ValueError(
                f"`from_logits` must be True, False or None; received: {from_logits!r}."
            )
        self.from_logits = from_logits
        if kl_output is not None and not isinstance(kl_output, str):
            raise ValueError(
                f"`kl_output` must be an output name (str) or None; received: {kl_output!r}."
            )
        self.kl_output = kl_output
        super().__init__(model, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(
            kl_weight=self.kl_weight,
            temperature=self.temperature,
            ema_decay=self.ema_decay,
            kl_start_epoch=self.kl_start_epoch,
            kl_end_epoch=self.kl_end_epoch,
            from_logits=self.from_logits,
            kl_output=self.kl_output,
        )
        return config

    # ------------------------------------------------------------ own state
    def build_state(self):
        # One average per floating-point variable of the model, found by its
        # path (freezing a layer later leaves the others in place); whether
        # the average holds weights yet (0 / 1); the epoch fit is in.
        self.add_state("mesa_ema", like="variables")
        self.add_state("mesa_ema_started")
        self.add_state("mesa_epoch")

    def _averaged(self):
        """The model's variables that are averaged, in a fixed order."""
        return self.state_sources("mesa_ema")

    def current_rho(self):
        return 0.0

    def ema_weights(self):
        """The moving average of the weights, as NumPy arrays in the order of
        `model.weights` (variables that are not floats: their current value)."""
        averages = dict(zip([v.path for v in self._averaged()], self.state_variables()["mesa_ema"]))
        return [ops.convert_to_numpy(averages.get(v.path, v).value) for v in self.inner.weights]

    # ------------------------------------------------------------ fit hooks
    def _fit_callbacks(self):
        """The epoch counter that switches the distillation term on."""
        return [_EpochCounter(self.state_variables()["mesa_epoch"])]

    def _logits_of(self, outputs):
        """The classification output the term applies to, as logits."""
        if isinstance(outputs, dict) or isinstance(outputs, (list, tuple)):
            if self.kl_output is None:
                raise ValueError(
                    "MESAModel: this model has several outputs; pass `kl_output`, "
                    "the name of the classification output the distillation "
                    f"term applies to (one of {self.output_names})."
                )
            if isinstance(outputs, dict):
                outputs = outputs[self.kl_output]
            else:
                outputs = outputs[list(self.output_names).index(self.kl_output)]
        if self._outputs_are_logits():
            return outputs
        return ops.log(ops.maximum(ops.cast(outputs, "float32"), 1e-12))

    def _outputs_are_logits(self):
        if self.from_logits is not None:
            return self.from_logits
        loss = self.loss
        if isinstance(loss, dict) and self.kl_output is not None:
            loss = loss.get(self.kl_output)
        if isinstance(loss, keras.losses.Loss):
            config = loss.get_config()
            if "from_logits" in config:
                return bool(config["from_logits"])
        if isinstance(loss, str) and loss in _PROBABILITY_LOSSES:
            return False
        raise ValueError(
            f"MESAModel cannot tell from the compiled loss ({loss!r}) whether the "
            "model outputs logits or probabilities; pass `from_logits=True` or "
            "`from_logits=False` to MESAModel."
        )

    def _ema_layout(self):
        """Where the step finds what the average needs, worked out once (no
        per-step Python over the variables on an eager backend):

        - `sources`: for each averaged variable, `("weights", i)` or
          `("state", i)`, its position in the step's weights or state;
        - `teacher_trainable`: for each trainable variable of the inner
          model, the index of its average;
        - `teacher_state`: for each non-trainable variable of the inner model,
          the index of its average, or its `sources` entry when it is not
          averaged (an integer counter, say).
        """
        layout = self.__dict__.get("_ema_layout_cache")
        if layout is None:
            index = {id(v): ("weights", i) for i, v in enumerate(self.trainable_variables)}
            index.update({id(v): ("state", i) for i, v in enumerate(self.non_trainable_variables)})
            averaged = self._averaged()
            by_path = {v.path: k for k, v in enumerate(averaged)}
            layout = (
                tuple(index[id(v)] for v in averaged),
                tuple(by_path[v.path] for v in self.inner.trainable_variables),
                tuple(
                    by_path.get(v.path, index[id(v)]) for v in self.inner.non_trainable_variables
                ),
            )
            # Not a tracked attribute: plain data, rebuilt by each new instance.
            self.__dict__["_ema_layout_cache"] = layout
        return layout

    # ------------------------------------------------------------- the step
    def loss_term(self, x, weights, non_trainable, state):
        """The distillation term from the teacher at the moving average (which
        starts from the weights of the first step)."""
        sources, teacher_trainable, teacher_state = self._ema_layout()

        def current(source):
            kind, i = source
            return weights[i] if kind == "weights" else non_trainable[i]

        started = state["mesa_ema_started"]
        ema = [ops.where(started > 0, a, current(s)) for a, s in zip(state["mesa_ema"], sources)]
        state = dict(state, mesa_ema=ema)
        if not self.kl_weight:
            return None, state
        teacher_outputs, _ = self.inner.stateless_call(
            [ema[k] for k in teacher_trainable],
            [ema[k] if isinstance(k, int) else current(k) for k in teacher_state],
            x,
            training=False,
        )
        teacher_logits = ops.stop_gradient(self._logits_of(teacher_outputs))
        on = state["mesa_epoch"] > self.kl_start_epoch
        if self.kl_end_epoch is not None:
            on = ops.logical_and(on, state["mesa_epoch"] < self.kl_end_epoch)
        weight = self.kl_weight * ops.cast(on, "float32")

        def term(y_pred):
            kl = rules.mesa_kl(self._logits_of(y_pred), teacher_logits, self.temperature)
            return ops.cast(weight * kl, "float32"), {"kl": kl}

        return term, state

    def after_apply(self, variables, non_trainable, state):
        """The average moves toward the weights (and statistics) after the step."""
        sources = self._ema_layout()[0]
        new = [variables[i] if kind == "weights" else non_trainable[i] for kind, i in sources]
        ema = rules.ema_update(state["mesa_ema"], new, self.ema_decay)
        started = ops.ones_like(state["mesa_ema_started"])
        return dict(state, mesa_ema=ema, mesa_ema_started=started)


class _EpochCounter(keras.callbacks.Callback):
    """Writes the epoch `fit` is in into MESA's counter before each epoch."""

    def __init__(self, counter):
        super().__init__()
        self._counter = counter

    def on_epoch_begin(self, epoch, logs=None):
        self._counter.assign(float(epoch))
