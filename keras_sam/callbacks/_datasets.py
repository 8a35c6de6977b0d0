"""The training pipelines of `BatchSizeScheduler`: one per batch size, built
once by the user's `dataset_fn` and checked (batched by the size asked,
finite and known cardinality; the data given to `fit()` batched as
scheduled), and what an epoch draws from them: the pipeline itself, the
same with the batch dimension hidden (one trace for every batch size), or
this process's share of every global batch under a multi-process
`keras.distribution`. Also the checks of a batch size against the replicas,
the devices and the model's sub-batches."""

from keras_sam._keras_compat import distribution as distribution_internals

_FEATURE = "BatchSizeScheduler"


class DatasetCache:
    """`dataset_fn`'s pipelines by batch size, checked once, and their steps.

    Args:
        dataset_fn: a callable `batch_size -> tf.data.Dataset`, batched.
    """

    def __init__(self, dataset_fn):
        self.dataset_fn = dataset_fn
        self._datasets = {}  # batch size -> tf.data.Dataset
        self._steps = {}  # batch size -> cardinality
        self._drawn = {}  # (batch size, "relaxed" | "static" | "process") -> dataset

    def dataset(self, batch_size):
        """`dataset_fn(batch_size)`, built and checked on first use."""
        if batch_size not in self._datasets:
            dataset = self.dataset_fn(batch_size)
            self._steps[batch_size] = check_dataset(dataset, batch_size)
            self._datasets[batch_size] = dataset
        return self._datasets[batch_size]

    def steps(self, batch_size):
        """The number of batches of `dataset_fn(batch_size)`."""
        self.dataset(batch_size)
        return self._steps[batch_size]

    def drawn(self, batch_size, relaxed, sharding=None):
        """What an epoch at `batch_size` draws: this process's share when
        `sharding` splits batches between processes, else the pipeline with
        its batch dimension hidden (`relaxed`) or as built."""
        if sharding is not None and sharding.per_process:
            key = (batch_size, "process")
            if key not in self._drawn:
                self._drawn[key] = sharding.process_dataset(
                    self.dataset(batch_size), self.steps(batch_size)
                )
        else:
            key = (batch_size, "relaxed" if relaxed else "static")
            if key not in self._drawn:
                dataset = self.dataset(batch_size)
                self._drawn[key] = hide_batch_dim(dataset) if relaxed else dataset
        return self._drawn[key]

    def batch_size_of_fit_data(self, adapter, num_batches, allowed, initial_epoch, sharding):
        """The batch size of the data passed to `fit()` (its data `adapter`,
        `num_batches` a step), checked against the `allowed` sizes: the
        schedule's at epoch 0 and at `initial_epoch` (a run continued by
        hand). `sharding` splits every batch between processes, or is None."""
        where = "at epoch 0" + (
            f" and {allowed[1]} at initial_epoch={initial_epoch}" if len(allowed) > 1 else ""
        )
        names = " or ".join(f"`dataset_fn({b})`" for b in allowed)
        given = getattr(adapter, "batch_size", None)
        if sharding is not None:
            # fit's adapter holds this process's slice, of unknown cardinality
            drawn = {b: self.drawn(b, False, sharding) for b in allowed}
            locals_ = {leading_dim(d): b for b, d in drawn.items()}
            if given is not None and given not in locals_:
                raise ValueError(
                    f"The data passed to `fit()` gives this process batches "
                    f"of {given}, but `schedule` gives a global batch size of "
                    f"{allowed[0]} {where}, i.e. {', '.join(map(str, locals_))} in each of "
                    f"the {sharding.num_processes} processes. Pass {names} (the full "
                    "pipeline, batched with the GLOBAL batch size) to `fit()` in every process."
                )
            return locals_.get(given, allowed[0])
        if given is not None and given not in allowed:
            raise ValueError(
                f"The data passed to `fit()` has batch size {given}, but "
                f"`schedule` gives {allowed[0]} {where}. Pass {names} to `fit()`."
            )
        matching = [b for b in allowed if self.steps(b) == num_batches and given in (None, b)]
        if not matching:
            raise ValueError(
                f"The data passed to `fit()` has {num_batches} batches per epoch, but "
                + " and ".join(f"`dataset_fn({b})` has {self.steps(b)}" for b in allowed)
                + f". Pass {names} to `fit()`."
            )
        return matching[0] if given is None else given


# ------------------------------------------------------------------- checks
def check_distribution(relax_batch_shape):
    """The active keras.distribution as a `DataSharding` (None: none),
    checked for use with the scheduler."""
    sharding = distribution_internals.data_sharding()
    if sharding is None:
        return None
    if sharding.multi_process and not sharding.auto_shard:
        raise ValueError(
            f"{_FEATURE} needs `auto_shard_dataset=True` on the "
            f"multi-process keras.distribution ({sharding.num_processes} "
            "processes): every process passes the same full pipeline, "
            "batched with the GLOBAL batch size, and Keras gives each "
            "process its slice of every batch."
        )
    if sharding.per_process and relax_batch_shape:
        raise ValueError(
            "`relax_batch_shape=True` cannot be used across processes: "
            "keras.distribution reads the global batch size from the "
            "dataset to split it between the processes. Leave it None."
        )
    return sharding


def check_batch_size(batch_size, where, replicas, sharding, model):
    """A global batch size divides between the devices of the
    keras.distribution (`sharding`), the strategy's `replicas`, and the
    model's sub-batches (`model.num_splits` of a keras_sam wrapper)."""
    devices = sharding.num_replicas if sharding else 1
    if batch_size % devices:
        raise ValueError(
            f"`schedule`: the batch size {batch_size} ({where}) is "
            "not divisible by the number of devices the keras.distribution "
            f"splits each batch over ({devices}, across "
            f"{sharding.num_processes} process(es)); the batch size "
            f"is global. Use multiples of {devices}."
        )
    if batch_size % replicas:
        raise ValueError(
            f"`schedule`: the batch size {batch_size} ({where}) is "
            f"not divisible by the number of replicas ({replicas}); the "
            "batch size is global and each replica gets an equal share. "
            f"Use multiples of {replicas}."
        )
    num_splits = getattr(model, "num_splits", None)
    if callable(num_splits):
        try:
            num_splits(batch_size // replicas)
        except ValueError as e:
            raise ValueError(
                f"`schedule`: the batch size {batch_size} ({where}, "
                f"{batch_size // replicas} per replica) does not suit the "
                f"model: {e}"
            ) from e


def leading_dim(dataset):
    import tensorflow as tf

    return tf.nest.flatten(dataset.element_spec)[0].shape[0]


def check_full_batches(dataset, batch_size):
    """Across processes every batch must be full: each process draws a slice
    of every global batch, and a short last batch would leave the processes
    with different step counts."""
    import tensorflow as tf

    for spec in tf.nest.flatten(dataset.element_spec):
        shape = getattr(spec, "shape", None)
        if shape is None or shape.rank is None or shape.rank == 0 or (shape[0] != batch_size):
            raise ValueError(
                f"Across processes (keras.distribution), `dataset_fn` must "
                f"batch with `drop_remainder=True`: dataset_fn({batch_size}) "
                f"yields elements of shape {shape}, not a static batch of "
                f"{batch_size}. Keras reads the global batch size from the "
                "dataset and splits every batch between the processes; a "
                "short last batch would leave them with different step counts."
            )


def hide_batch_dim(dataset):
    """The same dataset with the batch dimension of its element spec unknown,
    so one traced train function serves every batch size."""
    import tensorflow as tf

    def hide(*element):
        element = element[0] if len(element) == 1 else element
        return tf.nest.map_structure(
            lambda t: tf.compat.v1.placeholder_with_default(t, [None] + t.shape[1:]),
            element,
        )

    return dataset.map(hide)


def check_dataset(dataset, batch_size):
    """Checks `dataset_fn`'s output; returns its cardinality."""
    import tensorflow as tf

    if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(
            "`dataset_fn` must return a batched tf.data.Dataset; "
            f"dataset_fn({batch_size}) returned {type(dataset).__name__}."
        )
    specs = tf.nest.flatten(dataset.element_spec)
    for spec in specs:
        shape = getattr(spec, "shape", None)
        if shape is None or shape.rank is None:
            continue
        leading = shape[0] if shape.rank else "scalar"
        if leading not in (None, batch_size):
            raise ValueError(
                f"`dataset_fn` must return a dataset batched by `batch_size`: "
                f"dataset_fn({batch_size}) yields elements of shape {shape} "
                f"(element_spec {dataset.element_spec}). Call "
                "`.batch(batch_size)` inside `dataset_fn`."
            )
    cardinality = int(dataset.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            f"`dataset_fn({batch_size})` returned an infinite dataset; "
            f"{_FEATURE} needs each epoch's number of batches. Remove "
            "`repeat()` from `dataset_fn` (fit() runs it once per epoch)."
        )
    if cardinality < 0:
        raise ValueError(
            f"`dataset_fn({batch_size})` returned a dataset of unknown "
            f"cardinality; {_FEATURE} needs each epoch's number of batches. "
            "Avoid `filter()`, `repeat()` and generators in `dataset_fn`, or "
            "state the count: "
            "`dataset.apply(tf.data.experimental.assert_cardinality(n))`."
        )
    if cardinality == 0:
        raise ValueError(
            f"`dataset_fn({batch_size})` returned an empty dataset (no full "
            "batch: too few examples for this batch size?)."
        )
    return cardinality
