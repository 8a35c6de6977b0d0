"""`MonitorRule`: Keras' rule for "has the monitored value improved?".

`keras.callbacks.ReduceLROnPlateau`, `EarlyStopping` and `ModelCheckpoint`
share it through Keras' `MonitorCallback` (not public API), whose logic this
class repeats for objects that are not callbacks (the batch-size policies):

- `mode="min"`: `current` improves on `best` when `current + min_delta < best`;
- `mode="max"`: when `current - min_delta > best`;
- `mode="auto"`: "min" for `loss` and `val_loss`; otherwise the direction of
  the compiled metric of that name ("max" for accuracy, AUC, F-scores, ...,
  "min" for errors and cross-entropies); a metric Keras cannot tell is an
  error that asks for an explicit mode;
- the first value always improves (no best yet).

The comparison runs through `keras.ops`, as Keras' does, so that both round
alike.
"""

import keras

from keras_sam import _validation
from keras_sam._keras_compat import fit_loop

MODES = ("auto", "min", "max")


class MonitorRule:
    """The improvement rule of Keras' monitoring callbacks.

    Args:
        monitor: the logs key to watch, e.g. `"loss"`, `"val_loss"`,
            `"val_accuracy"` or a metric's name.
        mode: `"auto"`, `"min"` or `"max"` (see the module docstring).
        min_delta: an improvement is a change by more than this, >= 0.
    """

    def __init__(self, monitor, mode="auto", min_delta=0.0):
        if not isinstance(monitor, str) or not monitor:
            raise _validation.error("monitor", "a logs key such as 'loss' or 'val_loss'", monitor)
        self.monitor = monitor
        self.mode = _validation.one_of("mode", mode, MODES)
        self.min_delta = _validation.real("min_delta", min_delta, low=0)
        self.direction = None if self.mode == "auto" else self.mode
        """"min" or "max" once known (`resolve_direction`)."""

    @property
    def watches_validation(self):
        """Whether the monitored value comes from the validation data."""
        return self.monitor.startswith("val_")

    def resolve_direction(self, model=None, element_spec=None):
        """Sets and returns `direction` ("min" or "max").

        In "auto" mode the direction comes from the name (`loss`) or from the
        compiled metric named like the monitor (`model`'s, built from
        `element_spec` first where Keras has not built them yet).

        Raises:
            ValueError: when "auto" cannot tell, as Keras' callbacks do.
        """
        if self.direction is None:
            name = self.monitor.removeprefix("val_")
            if name == "loss":
                self.direction = "min"
            elif model is not None:
                up = fit_loop.compiled_metric_directions(model, element_spec).get(name)
                if up is not None:
                    self.direction = "max" if up else "min"
        if self.direction is None:
            raise ValueError(
                f"{type(self).__name__} received monitor={self.monitor!r}, but cannot "
                "tell whether that metric should be maximized or minimized "
                "(Keras knows it for 'loss' and for its own metrics, compiled with "
                "the model). Pass `mode='max'` to act on the highest value, or "
                "`mode='min'` to act on the lowest."
            )
        return self.direction

    def is_improvement(self, current, best):
        """Whether `current` improves on `best` (None: no best yet)."""
        if best is None:
            return True
        if self.resolve_direction() == "min":
            return bool(keras.ops.less(current + self.min_delta, best))
        return bool(keras.ops.greater(current - self.min_delta, best))

    def get_config(self):
        return {"monitor": self.monitor, "mode": self.mode, "min_delta": self.min_delta}
