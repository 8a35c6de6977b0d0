"""Random weight perturbation: flatness at one gradient per step.

Instead of SAM's worst-case direction (a second gradient), RWP takes the
step's gradient at randomly perturbed weights, `g = grad f_B(w + n)` with
Gaussian `n`, i.e. descends the expected loss `E_n f(w + n)` ("Bayes"
objective), and applies `g` at `w`:

- `RWPModel`: filter-wise noise on every trainable weight (Li et al., TMLR
  2024, `keras_sam.rules.rwp_noise`), optionally mixed with the clean
  gradient (m-RWP, two evaluations);
- `FlatLoRAModel`: LoRA's form (Li et al., ICML 2025): the noise is on each
  LoRA layer's MERGED weight `W + s A B` in the full weight space
  (`keras_sam.rules.flat_lora_noise`), while only `A` and `B` train.

The noise is drawn from `(seed, step)` (`_weight_noise`), never stored.
"""

import random

import keras
from keras import ops

from keras_sam import _validation
from keras_sam import rules
from keras_sam._keras_compat import layers as layer_internals
from keras_sam.models import _lora_state
from keras_sam.models import _weight_noise
from keras_sam.models.method import OneGradientModel


def _radius(rho):
    """A float `>= 0`, or a schedule: a callable of the step count (a
    `keras.optimizers.schedules.LearningRateSchedule`)."""
    if isinstance(rho, dict):  # from a saved config
        rho = keras.saving.deserialize_keras_object(rho)
    if callable(rho):
        return rho
    return _validation.real("rho", rho, low=0)


def _seed(seed):
    if seed is None:
        return random.randint(0, 2**31 - 1)
    return _validation.integer("seed", seed, low=0, high=2**31 - 1)


def _filter_axis(variable):
    """The axis of one filter (output unit): the last of a Dense, Conv or
    EinsumDense kernel `(inputs..., outputs)`; the first of an Embedding's
    `(tokens, dim)` table, one token per filter as in PyTorch's layout."""
    return 0 if variable.name == "embeddings" else -1


class _RandomWeightPerturbation(OneGradientModel):
    """What RWP and Flat-LoRA share: the radius (a float or a schedule of the
    step), the seed, the noise of a step."""

    def __init__(self, model, rho, seed=None, **kwargs):
        self.rho = _radius(rho)
        self.seed = _seed(seed)
        super().__init__(model, **kwargs)

    def get_config(self):
        config = super().get_config()
        rho = self.rho
        if callable(rho):
            rho = keras.saving.serialize_keras_object(rho)
        config.update(rho=rho, seed=self.seed)
        return config

    def _step(self):
        return ops.convert_to_tensor(self.optimizer.iterations)

    def current_rho(self, step=None):
        """The noise radius at `step` (default: the optimizer's step count):
        `rho`, or `rho(step)` for a schedule."""
        if not callable(self.rho):
            return self.rho
        return self.rho(self._step() if step is None else step)

    def _noise_is_off(self, rho):
        return isinstance(rho, (int, float)) and rho == 0

    def standard_normals(self, step):
        """The standard normal draws `z` of step `step` (one per perturbed
        weight, see `_perturbed_shapes`), as the training step draws them."""
        return _weight_noise.standard_normals(self._perturbed_shapes(), self.seed, step)


@keras.saving.register_keras_serializable(package="keras_sam")
class RWPModel(_RandomWeightPerturbation):
    """Wraps a Keras model so that `fit` trains it with random weight perturbation.

    Each step draws Gaussian noise `n` for every trainable weight, filter by
    filter with standard deviation `rho * ||filter||` (a 1-D weight such as
    a bias: `rho` times its whole norm; `keras_sam.rules.rwp_noise`),
    evaluates ONE gradient at `w + n` and hands it to the compiled optimizer,
    which applies it at `w`. This is RWP as in the official code (nblt/mARWP,
    `ARWP` without its Fisher scaling). With `clean_weight=c > 0` the step
    also evaluates the clean gradient on the same batch and descends along
    `(1 - c) g(w + n) + c g(w)`: m-RWP, two evaluations (the official code's
    `lambda` is `1 - c`; it computes the two on two devices' batches).

    Filters: one output unit, i.e. a slice along the last axis of a Dense,
    Conv or EinsumDense kernel (PyTorch's first axis), and one token (row) of
    an Embedding table.

    Noise: a pure function of `seed` and the optimizer's step count,
    regenerated when needed and never stored; it is the same on every
    replica (`MirroredStrategy`) and device (JAX), so the result does not
    depend on the replica count, and a run resumed by `BackupAndRestore`
    draws what the uninterrupted run drew. The model's variables always
    hold `w`: `evaluate`, `predict` and `save` see the unperturbed weights.

    What is logged: `loss` and the metrics of the perturbed pass (of the
    clean pass with `clean_weight > 0`), `grad_norm` (of the descent's
    perturbed gradient) and `rho`. BatchNorm statistics move once per step,
    from that same pass. `rho=0` is plain training, exactly.

    Args:
        model: the `keras.Model` to train, built.
        rho: the noise's standard deviation relative to each filter's norm,
            `>= 0` (the official code's `std`: 0.001-0.015 on CIFAR), or a
            schedule of the step count, e.g. the official cosine increase
            `keras_sam.schedules.CosineAnnealing(std, std * (1 + inc),
            epochs, steps_per_epoch)`, which gives
            `std * (1 + inc * (1 - cos(pi t / T)) / 2)`.
        clean_weight: `c` in `[0, 1)`, the clean gradient's share (m-RWP;
            the official default `lambda = 0.5` is `c = 0.5`). 0 (default):
            one gradient per step.
        seed: int in `[0, 2**31)` for the noise; None: drawn from Python's
            `random` module when the wrapper is made, and kept in the config.
            `keras.utils.set_random_seed(s)` seeds that module too, so after
            it wrappers made in the same order get the same seeds, run after
            run: pass `seed` to give two wrappers different noise.
        **kwargs: passed to `keras.Model` (e.g. `name`).

    Example:

    ```python
    model = keras_sam.RWPModel(inner, rho=0.01)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=...)
    model.fit(x, y, epochs=10)   # one gradient per step
    ```
    """

    _takes = "Pass `rho`, `clean_weight`, `seed` (and keras.Model keywords such as `name`)."

    def __init__(self, model, rho=0.01, clean_weight=0.0, seed=None, **kwargs):
        self.clean_weight = _validation.real(
            "clean_weight", clean_weight, low=0, high=1, high_inclusive=False
        )
        super().__init__(model, rho=rho, seed=seed, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(clean_weight=self.clean_weight)
        return config

    def _perturbed_shapes(self):
        return [tuple(v.shape) for v in self.trainable_variables]

    @property
    def uses_clean_gradient(self):
        return self.clean_weight > 0

    def perturbation(self, weights, non_trainable, rho):
        """Filter-wise Gaussian noise, `rho` times each filter's norm."""
        if self._noise_is_off(rho):
            return None, None
        axes = [_filter_axis(v) for v in self.trainable_variables]
        return rules.rwp_noise(self.standard_normals(self._step()), weights, rho, axes), None

    def descent(self, gradients, clean_gradients):
        """m-RWP: `(1 - c) g(w + n) + c g(w)`."""
        return rules.mixed_gradient(clean_gradients, gradients, self.clean_weight)


def lora_layers(model):
    """The layers of `model` whose weight Flat-LoRA perturbs: Dense and
    EinsumDense layers with LoRA enabled (`layer.enable_lora(rank)`,
    `backbone.enable_lora(rank)` in KerasHub), in a fixed order."""
    return [
        layer
        for layer in _lora_state.lora_layers(model)
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
    ]


@keras.saving.register_keras_serializable(package="keras_sam")
class FlatLoRAModel(_RandomWeightPerturbation):
    """Wraps a model with LoRA layers so that `fit` trains it with Flat-LoRA.

    LoRA trains `A` and `B` of each adapted layer, whose forward pass uses
    the merged weight `W' = W + s A B` (`s = lora_alpha / rank`, `W`
    frozen). Flat-LoRA seeks an `(A, B)` whose merged weight lies in a flat
    region of the FULL weight space: each step draws Gaussian noise `n` on
    every merged weight, output unit by output unit with standard deviation
    `factor * rho / sqrt(fan_in) * ||W'_unit||` (`keras_sam.rules.flat_lora_noise`),
    and evaluates ONE gradient of the loss at `W + n + s A B` with respect
    to `A`, `B` and the other trainable weights (a classifier head, say),
    which the compiled optimizer applies. The frozen `W` is never written:
    the noise enters the forward pass as a temporary, so `W` stays bitwise
    equal, and nothing of the noise outlives the step.

    `factor` follows the paper's cosine increase from 0 to 1 over
    `ramp_steps` optimizer steps (the official code ramps over the whole
    training, `epochs * steps_per_epoch`), then stays 1; `ramp_steps=None`
    keeps it 1.

    Against the official code (nblt/Flat-LoRA, a PyTorch/PEFT trainer):

    - the formula is the same; Keras kernels are `(inputs..., outputs)`, so
      a PyTorch row (one output unit) is a slice along the last axis here
      and `fan_in` the product of the other axes. For an EinsumDense kernel
      with several output axes (attention's `(heads, hidden, head_dim)`),
      this follows Keras' own LoRA, which treats the kernel as the matrix
      `(prod(shape[:-1]), shape[-1])`;
    - `s` is Keras' `lora_alpha / rank` (`lora_alpha` defaults to `rank`,
      so `s = 1`; PEFT's default is `16 / rank`);
    - which layers: those with LoRA enabled. KerasHub's
      `backbone.enable_lora(rank)` adapts the attention query and value
      projections only; the paper's experiments adapt every linear layer.
      Embedding layers with LoRA get no noise (the official code perturbs
      linear layers only);
    - the noise is drawn from `(seed, step)` (the official code seeds from
      the clock and subtracts the same noise after the backward pass, which
      rounds `W`); `T` (new noise every T steps) is 1 here, the official
      default;
    - quantized layers are refused.

    The noise is the same on every replica and device (see `RWPModel`).
    What is logged: `loss` and the metrics of the perturbed pass,
    `grad_norm`, and `rho` (with the ramp's factor). `rho=0` is plain
    training, exactly.

    Args:
        model: the `keras.Model` to train, built, with LoRA enabled on at
            least one Dense or EinsumDense layer.
        rho: the noise radius, `>= 0` (the official default is 0.05), or a
            schedule of the step count (then `ramp_steps` multiplies it).
        ramp_steps: int `>= 1` or None, see above.
        seed: int in `[0, 2**31)` for the noise; None: drawn from Python's
            `random` module when the wrapper is made, and kept in the config.
            `keras.utils.set_random_seed(s)` seeds that module too, so after
            it wrappers made in the same order get the same seeds, run after
            run: pass `seed` to give two wrappers different noise.
        **kwargs: passed to `keras.Model` (e.g. `name`).

    Example:

    ```python
    causal_lm.backbone.enable_lora(rank=8)
    model = keras_sam.FlatLoRAModel(causal_lm, rho=0.05, ramp_steps=epochs * steps)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4), loss=...)
    model.fit(data, epochs=epochs)
    ```
    """

    _takes = "Pass `rho`, `ramp_steps`, `seed` (and keras.Model keywords such as `name`)."

    def __init__(self, model, rho=0.05, ramp_steps=None, seed=None, **kwargs):
        self.ramp_steps = _validation.integer("ramp_steps", ramp_steps, low=1, allow_none=True)
        super().__init__(model, rho=rho, seed=seed, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(ramp_steps=self.ramp_steps)
        return config

    def current_rho(self, step=None):
        """`rho` (or `rho(step)`) times the ramp's factor at `step`."""
        step = self._step() if step is None else step
        rho = super().current_rho(step)
        if self.ramp_steps is None or self._noise_is_off(rho):
            return rho
        return rules.cosine_ramp(step, self.ramp_steps) * rho

    def _before_fit(self, bound):
        self._lora_layers()  # a clear error before any step

    def _lora_layers(self):
        layers = lora_layers(self.inner)
        if not layers:
            others = [
                f"{type(layer).__name__} {layer.name!r}"
                for layer in _lora_state.lora_layers(self.inner)
            ]
            found = (
                f"found LoRA enabled only on {', '.join(others)}, which it does not perturb"
                if others
                else "found no layer with LoRA enabled"
            )
            raise ValueError(
                f"FlatLoRAModel perturbs the merged weights of Dense and EinsumDense "
                f"layers with LoRA enabled, and {found} in `model` ({self.inner.name}). "
                "Enable LoRA on such layers first, e.g. "
                "`backbone.enable_lora(rank=8)` for a KerasHub model or "
                "`layer.enable_lora(rank)` on Dense / EinsumDense layers; to "
                "perturb all weights of a model, use RWPModel."
            )
        for layer in layers:
            if layer.quantization_mode is not None:
                raise ValueError(
                    f"FlatLoRAModel does not support quantized layers: {layer.name} "
                    f"is quantized ({layer.quantization_mode!r})."
                )
        return layers

    def _perturbed_shapes(self):
        return [tuple(layer_internals.raw_kernel(layer).shape) for layer in self._lora_layers()]

    def perturbation(self, weights, non_trainable, rho):
        """Noise on each LoRA layer's merged weight `W + s A B`, added to the
        frozen `W` for this pass only."""
        if self._noise_is_off(rho):
            return None, None
        trainable = {id(v): i for i, v in enumerate(self.trainable_variables)}
        fixed = {id(v): i for i, v in enumerate(self.non_trainable_variables)}
        offsets = [None] * len(non_trainable)
        layers = self._lora_layers()
        for layer, z in zip(layers, self.standard_normals(self._step())):
            k = fixed[id(layer_internals.raw_kernel(layer))]
            a = weights[trainable[id(layer.lora_kernel_a)]]
            b = weights[trainable[id(layer.lora_kernel_b)]]
            kernel = non_trainable[k]
            scale = getattr(layer, "lora_alpha", layer.lora_rank) / layer.lora_rank
            merged = ops.cast(kernel, a.dtype) + scale * ops.matmul(a, b)
            offsets[k] = ops.cast(rules.flat_lora_noise(z, merged, rho), kernel.dtype)
        return None, offsets
