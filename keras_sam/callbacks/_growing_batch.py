"""What the batch-size policies that decide as training goes share:
`AdaptiveBatchSize` (from the noise scale) and `BatchSizeOnPlateau` (from a
stalled metric). `BatchSizeScheduler` asks a policy for the batch size of
each epoch and hands it each epoch's logs; the policy records its decisions
(and the state behind them) per epoch, so that a run resumed by
`BackupAndRestore` continues as the uninterrupted run did.
"""

import json
import os

from keras_sam import _validation


class GrowingBatchSize:
    """Base class: a batch that starts at `initial_batch_size` and grows by
    `factor` up to `max_batch_size` when `_grows(epoch, batch_size, logs)`
    says so at an epoch's end.

    Subclasses define `_grows` (and `_state` / `_set_state` when the rule
    keeps state across epochs, `required_logs`, `check_model`).
    """

    def __init__(self, initial_batch_size, max_batch_size, factor):
        self.initial_batch_size = _validation.integer(
            "initial_batch_size", initial_batch_size, low=1
        )
        self.max_batch_size = _validation.integer(
            "max_batch_size", max_batch_size, low=self.initial_batch_size
        )
        self.factor = _validation.integer("factor", factor, low=2)
        self.history = {0: self.initial_batch_size}
        """The decisions: `{epoch: batch_size}` from each change on."""
        self._states = {}
        """The rule's state after each epoch's decision: `{epoch: state}`."""

    # ------------------------------------------------------------- the rule
    required_logs = ()
    """History keys the rule reads at every epoch's end."""

    def check_model(self, model, element_spec=None, validates=None):
        """Raises a ValueError, before training, when `model` cannot feed the
        rule (`element_spec`: the training data's; `validates`: whether `fit`
        was given validation data every epoch, None when unknown)."""

    # ------------------------------------- not a callback: a clear TypeError
    # Keras' CallbackList reads `async_safe` (JAX, PyTorch), then calls
    # `set_model` and `set_params` on every callback before training.
    @property
    def async_safe(self):
        raise TypeError(self._not_a_callback())

    def set_model(self, model):
        raise TypeError(self._not_a_callback())

    def set_params(self, params):
        raise TypeError(self._not_a_callback())

    def _not_a_callback(self):
        name = type(self).__name__
        return (
            f"{name} is a batch-size policy, not a callback: it decides the batch size "
            "that a BatchSizeScheduler feeds to `fit`. Wrap it and pass the scheduler "
            "first in `callbacks`:\n"
            f"    scheduler = keras_sam.callbacks.BatchSizeScheduler({name}(...), dataset_fn)\n"
            "    model.fit(dataset_fn(initial_batch_size), callbacks=[scheduler, ...])"
        )

    def _grows(self, epoch, batch_size, logs):
        raise NotImplementedError

    def _state(self):
        """The rule's own state (JSON-serializable), None when it has none."""
        return None

    def _set_state(self, state):
        """Sets the rule's state (None: as before the first epoch)."""

    # ------------------------------------------------------------ decisions
    def __call__(self, epoch):
        """The batch size of `epoch`: decided for the epochs run, and the
        current one after them (the projection if the batch grew no more)."""
        size = self.initial_batch_size
        for start, batch_size in sorted(self.history.items()):
            if start > epoch:
                break
            size = batch_size
        return size

    def reachable_batch_sizes(self):
        """Every batch size the rule can choose, smallest first."""
        sizes, size = [], self.initial_batch_size
        while size < self.max_batch_size:
            sizes.append(size)
            size *= self.factor
        return sizes + [self.max_batch_size]

    def decide_from_logs(self, epoch, logs):
        """Applies the rule at the end of `epoch` to its logs; records and
        returns the batch size of epoch `epoch + 1`."""
        missing = [k for k in self.required_logs if k not in logs]
        if missing:
            raise ValueError(
                f"{type(self).__name__} reads {', '.join(map(repr, missing))} from the "
                f"logs of every epoch, but epoch {epoch} logged only {sorted(logs)}."
            )
        self.forget_after(epoch)
        batch_size = self(epoch)
        size = batch_size
        if self._grows(epoch, batch_size, logs) and batch_size < self.max_batch_size:
            size = min(batch_size * self.factor, self.max_batch_size)
            self.history[epoch + 1] = size
        self._states[epoch] = self._state()
        return size

    def forget_after(self, epoch):
        """Drops the decisions for epochs after `epoch` and sets the rule's
        state to what it was when epoch `epoch + 1` began (a resumed run
        decides them again)."""
        self.history = {e: b for e, b in self.history.items() if e <= epoch}
        self._states = {e: s for e, s in self._states.items() if e < epoch}
        self._set_state(self._states.get(epoch - 1))

    def get_config(self):
        return {
            "initial_batch_size": self.initial_batch_size,
            "max_batch_size": self.max_batch_size,
            "factor": self.factor,
        }

    # ------------------------------------------------ saved with BackupAndRestore
    STATE_FILE = "keras_sam_batch_size_decisions.json"

    def save(self, folder):
        """Writes the decisions to `folder/STATE_FILE` whole or not at all."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, self.STATE_FILE)
        text = json.dumps(
            {
                "policy": type(self).__name__,
                "config": self.get_config(),
                "history": self.history,
                "states": self._states,
            }
        )
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def restore(self, folder):
        """Reads the decisions saved in `folder` (if any); True if read.

        Raises:
            ValueError: when they were made by another policy or configuration.
        """
        path = os.path.join(folder, self.STATE_FILE)
        if not os.path.exists(path):
            return False
        with open(path) as f:
            saved = json.load(f)
        name = saved.get("policy", "AdaptiveBatchSize")
        if name != type(self).__name__ or saved["config"] != self.get_config():
            raise ValueError(
                f"{path} holds batch-size decisions made with another {name} "
                f"({saved['config']}; this one: {type(self).__name__} "
                f"{self.get_config()}); use another BackupAndRestore `backup_dir` "
                "or delete the folder to start over."
            )
        self.history = {int(e): int(b) for e, b in saved["history"].items()}
        self._states = {int(e): s for e, s in saved.get("states", {}).items()}
        return True
