"""Replica functions for backends whose step always sees the global batch
(JAX, PyTorch): one replica, reductions are the identity."""

__all__ = ["num_replicas", "all_reduce"]


def num_replicas():
    return 1


def all_reduce(tensors, reduction):
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return list(tensors)
