"""Layer and backend internals (tested on Keras 3.12 and 3.15)."""


def random_seed_dtype():
    """The dtype of a Keras seed pair on this backend (`keras.random` takes
    the pair as a `SeedGenerator`'s state; see `models/_weight_noise.py`)."""
    from keras.src.backend import random_seed_dtype as seed_dtype

    return seed_dtype()


def all_layers(model):
    """Every layer inside `model`, nested ones included, in Keras' fixed order
    (`Layer._flatten_layers`: Keras has no public recursive walk)."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def raw_kernel(layer):
    """The kernel variable of a Dense or EinsumDense layer as stored (its
    `kernel` property returns `W + s A B` when LoRA is enabled): Keras'
    private `_kernel`."""
    return layer._kernel
