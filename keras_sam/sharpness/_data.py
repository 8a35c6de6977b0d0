"""The data adapter of the sharpness measures, and host-side array helpers.

`Batches` turns what a user passes as `data` (a `tf.data.Dataset`, an iterable
of batches, or a tuple of arrays split into batches) into a re-iterable of
`(x, y, sample_weight)` batches of backend tensors. It is what every measure
iterates over, and what a measure registered with
`keras_sam.sharpness.register_measure` receives from `SharpnessMonitor`.
"""

import keras
from keras import ops

from keras_sam import _validation

__all__ = ["Batches"]


def _is_array(x):
    """An array (numpy, backend tensor) with a batch dimension."""
    shape = getattr(x, "shape", None)
    return shape is not None and len(shape) >= 1 and not isinstance(x, (str, bytes))


def _is_array_tree(x):
    leaves = keras.tree.flatten(x)
    return bool(leaves) and all(_is_array(leaf) for leaf in leaves)


def _num_rows(x):
    return int(keras.tree.flatten(x)[0].shape[0])


def _slice(x, start, stop):
    return keras.tree.map_structure(lambda a: a[start:stop], x)


def _to_tensors(x):
    if x is None:
        return None
    return keras.tree.map_structure(ops.convert_to_tensor, x)


class Batches:
    """A re-iterable of `(x, y, sample_weight)` batches of backend tensors.

    `sample_weight` is `None` for batches without weights. Iterating raises a
    `ValueError` if `data` yields no batch.

    Args:
        data: A `tf.data.Dataset` or any iterable of `(x, y)` /
            `(x, y, sample_weight)` batches, or a tuple of arrays
            `(x, y[, sample_weight])` split into batches of `batch_size` in
            order (`x` may be a list or dict of arrays, `y` an array or a
            dict). A one-shot iterator (generator) is cached in memory on its
            first pass, so that later passes see the same batches.
        batch_size: Batch size when `data` is a tuple of arrays, `>= 1`.
            Defaults to 128.
        steps: Optional maximum number of batches, `>= 1` (required for an
            infinite dataset).
    """

    def __init__(self, data, batch_size=128, steps=None):
        self.steps = _validation.integer("steps", steps, low=1, allow_none=True)
        self._arrays = None
        self._cache = None
        self._one_shot = False
        if data is None:
            raise ValueError("`data` must not be None.")
        if (
            isinstance(data, (tuple, list))
            and len(data) in (2, 3)
            and _is_array_tree(data[0])
            and (_is_array(data[1]) or (isinstance(data[1], dict) and _is_array_tree(data[1])))
        ):
            # Arrays (x, y[, sample_weight]); x may be a structure of arrays,
            # y an array or a dict (a tuple y would read as a list of batches).
            self.batch_size = _validation.integer("batch_size", batch_size, low=1)
            x, y = data[0], data[1]
            sw = data[2] if len(data) == 3 else None
            n = _num_rows(x)
            if n == 0:
                raise ValueError("`data` is empty: the arrays have 0 rows.")
            for name, part in (("y", y), ("sample_weight", sw)):
                if part is not None and _num_rows(part) != n:
                    raise ValueError(f"`data`: x has {n} rows but {name} has {_num_rows(part)}.")
            self._arrays = (x, y, sw)
            return
        if hasattr(data, "cardinality"):  # tf.data.Dataset
            try:
                card = int(data.cardinality())
            except Exception:  # pragma: no cover
                card = None
            if card == 0:
                raise ValueError("`data` is an empty dataset.")
            if card == -1 and self.steps is None:
                raise ValueError("`data` is an infinite dataset: pass `steps` to bound it.")
        try:
            it = iter(data)
        except TypeError:
            raise ValueError(
                "`data` must be a tf.data.Dataset, an iterable of (x, y[, "
                "sample_weight]) batches or a tuple of arrays (x, y[, "
                f"sample_weight]). Received: {type(data).__name__}"
            ) from None
        self._one_shot = it is data
        self._data = data

    def _raw(self):
        if self._arrays is not None:
            x, y, sw = self._arrays
            n = _num_rows(x)
            for start in range(0, n, self.batch_size):
                stop = min(start + self.batch_size, n)
                yield (
                    _slice(x, start, stop),
                    _slice(y, start, stop),
                    None if sw is None else _slice(sw, start, stop),
                )
            return
        for batch in self._data:
            x, y, sw = keras.utils.unpack_x_y_sample_weight(batch)
            if y is None:
                raise ValueError(
                    "`data` batches must be (x, y) or (x, y, sample_weight) "
                    "tuples; got a batch without targets."
                )
            yield x, y, sw

    def __iter__(self):
        if self._cache is not None:
            yield from self._cache
            return
        cache = [] if self._one_shot else None
        count = 0
        for x, y, sw in self._raw():
            if self.steps is not None and count >= self.steps:
                break
            batch = (_to_tensors(x), _to_tensors(y), _to_tensors(sw))
            count += 1
            if cache is not None:
                cache.append(batch)
            yield batch
        if count == 0:
            raise ValueError("`data` is empty: it yielded no batches.")
        if cache is not None:
            self._cache = cache


def accumulate(sums, tensors):
    """Adds per-batch tensors into float64 NumPy sums, in place."""
    for acc, t in zip(sums, tensors):
        acc += ops.convert_to_numpy(t).astype("float64")
