"""LoRA factors that survive saving and loading.

Keras saves a layer with LoRA enabled (Dense, EinsumDense, Embedding,
convolutions) with `s * A @ B` merged into its kernel, and sets `A` and `B`
to zero when it loads one. The loaded model computes the same function, but
with `A = B = 0` both factors' gradients vanish: a fine-tune resumed by
`BackupAndRestore`, or continued after `load_model`, would train its
adapters no further. So the wrappers also save each LoRA layer's variables
as they are (the kernel without the merge, `A`, `B`) beside their own, under
keys `lora<i>_<j>` of the wrapper's entry in the weights file, and put them
back once Keras has loaded the layers: at the end of `load_weights` (what
`BackupAndRestore` calls) and, after `keras.models.load_model`, when `fit`
starts. A resumed run then continues exactly as the uninterrupted one.

A file without those keys (saved by keras_sam 0.4 or earlier, or a plain
Keras model wrapped after loading) leaves `A = B = 0`; `fit` then warns,
naming the layers, instead of training adapters that cannot move.
"""

import warnings

import numpy as np

from keras_sam._keras_compat import layers as layer_internals

PREFIX = "lora"


def lora_layers(model):
    """The layers of `model` with LoRA enabled, in a fixed order."""
    layers = layer_internals.all_layers(model)
    return [layer for layer in layers if getattr(layer, "lora_enabled", False)]


def save(model, store):
    """Writes the variables of `model`'s LoRA layers into `store`."""
    for i, layer in enumerate(lora_layers(model)):
        for j, variable in enumerate(layer.weights):
            store[f"{PREFIX}{i}_{j}"] = variable


def split(store):
    """`(own, saved)`: the store's entries that are not LoRA copies (a dict to
    load the wrapper's own variables from) and the LoRA copies, as arrays
    keyed by `(layer index, variable index)`."""
    own, saved = {}, {}
    for key in store.keys():
        if key.startswith(PREFIX):
            i, j = key[len(PREFIX) :].split("_")
            saved[int(i), int(j)] = np.asarray(store[key])
        else:
            own[key] = store[key]
    return own, saved


def restore(model, saved):
    """Assigns the saved LoRA variables (from `split`) to `model`'s LoRA
    layers.

    Raises:
        ValueError: when they do not match the model's LoRA layers.
    """
    layers = lora_layers(model)
    count = len({i for i, _ in saved})
    if count != len(layers):
        raise ValueError(
            f"The weights file holds the LoRA variables of {count} layer(s), but the "
            f"model has {len(layers)} layer(s) with LoRA enabled; enable LoRA on the "
            "same layers, with the same rank, as in the saved model."
        )
    for i, layer in enumerate(layers):
        for j, variable in enumerate(layer.weights):
            value = saved.get((i, j))
            if value is None or tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"The saved LoRA variables of layer {i} do not match {layer.name}'s "
                    f"{variable.path} {tuple(variable.shape)}; enable LoRA on the same "
                    "layers, with the same rank, as in the saved model."
                )
            variable.assign(value)


def warn_if_reset(model):
    """Warns when LoRA layers of `model` have `A = B = 0`, as Keras leaves
    them after loading: their adapters cannot train."""
    reset = [
        layer.name
        for layer in lora_layers(model)
        if all(not np.any(np.asarray(v)) for v in (_lora_a(layer), _lora_b(layer)) if v is not None)
    ]
    if reset:
        warnings.warn(
            f"The LoRA layers {reset} have both factors A and B equal to zero, as Keras "
            "leaves them after loading a saved model (it merges s * A @ B into the "
            "kernel on save and zeroes A and B on load; keras_sam's wrappers save the "
            "factors too, but files written by keras_sam 0.4 or earlier and plain Keras "
            "models lack them). With A = B = 0 neither factor gets a gradient, so the "
            "adapters will not train. Give A fresh values first, as `enable_lora` does: "
            "`layer.lora_kernel_a.assign(keras.initializers.HeUniform()("
            "layer.lora_kernel_a.shape))` (`lora_embeddings_a` for an Embedding).",
            stacklevel=3,
        )


def _lora_a(layer):
    return _first_attribute(layer, "lora_kernel_a", "lora_embeddings_a")


def _lora_b(layer):
    return _first_attribute(layer, "lora_kernel_b", "lora_embeddings_b")


def _first_attribute(layer, *names):
    for name in names:
        value = getattr(layer, name, None)
        if value is not None:
            return value
    return None
