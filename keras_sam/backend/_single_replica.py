"""Replica functions for backends whose step always sees the global batch
(JAX, PyTorch): one replica, reductions are the identity. Batch shapes are
always known when the step is traced, so sub-batch loops are Python loops."""

from keras_sam.backend._loops import python_loop as loop_over  # noqa: F401

__all__ = ["num_replicas", "all_reduce", "loop_over", "replica_loss", "keras_loss_share"]


def num_replicas():
    return 1


def all_reduce(tensors, reduction):
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return list(tensors)


def replica_loss(loss):
    return loss


def keras_loss_share(value):
    return value
