"""`BatchSchedule`: the global batch size of each epoch, in one place.

`keras_sam.callbacks.BatchSizeScheduler`, `keras_sam.schedules.steps_per_epoch`
and the benchmarks all read batch sizes through it, so "which batch size holds
at epoch e" has one answer.
"""

from keras_sam import _validation

_ALLOWED = (
    "an int, a dict {epoch: batch_size} of int epochs >= 0 (key 0 required) "
    "to int batch sizes >= 1, or a callable epoch -> batch_size"
)


class BatchSchedule:
    """The global batch size per (0-based) epoch.

    Args:
        schedule: an int (the same batch size every epoch); a dict
            `{epoch: batch_size}` in which each size holds from its epoch
            until the next key (key 0 required); or a callable
            `epoch -> batch_size`. NumPy integers are accepted.
        name: the argument name used in error messages.

    Example:

    ```python
    schedule = BatchSchedule({0: 16, 40: 32, 80: 64})
    schedule.at(50)                      # 32
    schedule.steps_per_epoch(50000, 3)   # [3125, 3125, 3125]
    ```
    """

    def __init__(self, schedule, name="schedule"):
        self.name = name
        self.schedule = schedule
        self._dict = None
        self._fn = None
        if _validation.as_int(schedule) is not None:
            size = _validation.integer(name, schedule, low=1)
            self._dict = {0: size}
        elif isinstance(schedule, dict):
            self._dict = self._checked(schedule)
        elif callable(schedule):
            self._fn = schedule
        else:
            raise _validation.error(name, _ALLOWED, schedule)

    def _checked(self, schedule):
        checked = {}
        for epoch, size in schedule.items():
            key = _validation.as_int(epoch)
            if key is None or key < 0:
                raise _validation.error(self.name, _ALLOWED, epoch, where=" key")
            value = _validation.as_int(size)
            if value is None or value <= 0:
                raise _validation.error(self.name, _ALLOWED, size, where=f" at epoch {epoch}")
            checked[key] = value
        if 0 not in checked:
            raise _validation.error(self.name, _ALLOWED, schedule, where=" (no key 0)")
        return dict(sorted(checked.items()))

    @property
    def is_callable(self):
        return self._fn is not None

    def as_dict(self):
        """The checked `{epoch: batch_size}` (None for a callable)."""
        return None if self._dict is None else dict(self._dict)

    def at(self, epoch):
        """The batch size of `epoch`.

        Raises:
            ValueError: when a callable schedule returns something that is not
                a positive int.
        """
        epoch = _validation.integer("epoch", epoch, low=0)
        if self._dict is not None:
            size = None
            for start, batch_size in self._dict.items():
                if start > epoch:
                    break
                size = batch_size
            return size
        size = self._fn(epoch)
        checked = _validation.as_int(size)
        if checked is None or checked <= 0:
            raise _validation.error(
                self.name,
                "a callable returning int batch sizes >= 1",
                size,
                where=f" from {self.name}({epoch})",
            )
        return checked

    def sizes(self, epochs):
        """The batch sizes of the first `epochs` epochs."""
        epochs = _validation.integer("epochs", epochs, low=1)
        return [self.at(epoch) for epoch in range(epochs)]

    def steps_per_epoch(self, num_examples, epochs, drop_remainder=True):
        """Optimizer steps of each of the first `epochs` epochs over
        `num_examples` examples (`num_examples // b` with `drop_remainder`,
        else `ceil(num_examples / b)`).

        Raises:
            ValueError: when an epoch would have no step.
        """
        num_examples = _validation.integer("num_examples", num_examples, low=1)
        steps = []
        for epoch, b in enumerate(self.sizes(epochs)):
            n = num_examples // b if drop_remainder else -(-num_examples // b)
            if n == 0:
                raise ValueError(
                    f"`{self.name}` gives batch size {b} at epoch {epoch}, more "
                    f"than `num_examples` ({num_examples}) with drop_remainder=True: "
                    "the epoch would have no step"
                )
            steps.append(int(n))
        return steps
