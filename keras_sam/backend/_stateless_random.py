"""Random-state functions for backends whose layers draw random numbers only
from Keras seed states (TensorFlow, JAX): the states are part of the step's
non-trainable state already, so there is nothing to save."""

__all__ = ["random_state", "set_random_state"]


def random_state():
    return None


def set_random_state(state):
    del state
