"""Batch sizes of the data `fit` is given and of a batch inside the step."""

import keras
from keras import ops
from keras import tree


def _batch_size(x):
    first = next(t for t in tree.flatten(x) if t is not None)
    return ops.shape(first)[0]


def _static_batch_size(x):
    first = next(t for t in tree.flatten(x) if t is not None)
    size = first.shape[0]
    return None if size is None else int(size)


def _first_batch_size(x, batch_size):
    """The global size of the first batch `fit` will draw from `x`.

    Returns:
        `(size, x)`: `size` is None when it cannot be told. Nothing is lost:
        a Python generator is replaced by one that yields the peeked batch
        first; datasets, `PyDataset`s and data loaders are read again by `fit`.
    """
    import types

    import tensorflow as tf

    if isinstance(x, tf.data.Dataset):
        first = tree.flatten(x.element_spec)[0]
        if first.shape.rank and first.shape[0] is not None:
            return int(first.shape[0]), x
        return _rows(next(iter(x.take(1)), None)), x
    if isinstance(x, keras.utils.PyDataset):
        try:
            batches = x.num_batches
        except (NotImplementedError, TypeError):
            batches = None
        return (_rows(x[0]) if batches else None), x
    if isinstance(x, types.GeneratorType):
        first = next(x, None)
        if first is None:
            return None, x

        def replay(first=first, rest=x):
            yield first
            yield from rest

        return _rows(first), replay()
    if type(x).__module__.startswith("torch.utils.data"):  # a DataLoader
        return _rows(next(iter(x), None)), x
    if hasattr(x, "shape") or isinstance(x, (list, tuple, dict)):
        rows = _rows(x) or 0
        size = 32 if batch_size is None else int(batch_size)
        return (min(size, rows) if rows else size), x
    return None, x


def _rows(batch):
    """Examples in a batch `(x, y, sample_weight)`, `(x, y)` or `x`."""
    if batch is None:
        return None
    x = batch[0] if isinstance(batch, tuple) else batch
    first = next(t for t in tree.flatten(x) if t is not None)
    return int(first.shape[0])
