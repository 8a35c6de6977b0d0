"""PyTorch gradients with `torch.autograd.grad` on detached leaves, so the
model's parameters never accumulate `.grad` and no graph outlives a pass."""

import torch
from keras import tree

from keras_sam.backend._seeded_normal import standard_normal  # noqa: F401
from keras_sam.backend._single_replica import all_reduce  # noqa: F401
from keras_sam.backend._single_replica import keras_loss_share  # noqa: F401
from keras_sam.backend._single_replica import loop_over  # noqa: F401
from keras_sam.backend._single_replica import num_replicas  # noqa: F401
from keras_sam.backend._single_replica import replica_loss  # noqa: F401

__all__ = [
    "standard_normal",
    "value_and_grad",
    "hessian_vector_product",
    "compile",
    "num_replicas",
    "all_reduce",
    "loop_over",
    "read_values",
    "no_grad",
    "replica_loss",
    "keras_loss_share",
    "random_state",
    "set_random_state",
]


def _detach(structure):
    return tree.map_structure(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, structure)


def value_and_grad(fn):
    def wrapped(values, *args, **kwargs):
        leaves = [v.detach().requires_grad_(True) for v in values]
        with torch.enable_grad():
            value, aux = fn(leaves, *args, **kwargs)
            grads = torch.autograd.grad(value, leaves, allow_unused=True)
        grads = [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, grads)]
        return (value.detach(), _detach(aux)), grads

    return wrapped


def hessian_vector_product(fn, values, vector):
    leaves = [v.detach().requires_grad_(True) for v in values]
    with torch.enable_grad():
        value = fn(leaves)
        grads = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
        grads = [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, grads)]
        dot = sum((g * u.detach()).sum() for g, u in zip(grads, vector))
        hvp = torch.autograd.grad(dot, leaves, allow_unused=True)
    return [torch.zeros_like(v) if h is None else h.detach() for v, h in zip(leaves, hvp)]


def compile(fn):  # noqa: A001 (the backend's name for the operation)
    """`fn` itself: PyTorch runs eagerly (no `torch.compile`)."""
    return fn


def read_values(variables):
    return [v.value.detach() for v in variables]


def no_grad():
    return torch.no_grad()


def random_state():
    """torch's global generator state: Keras layers without a seed (Dropout)
    draw from it, so both SAM passes restore it to get the same mask."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def set_random_state(state):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
