"""A crash in the middle of `fit`, for the resume tests (BackupAndRestore)."""

import keras


class Interrupt(Exception):
    """Raised by `InterruptAt`, as a crash would stop `fit`."""


class InterruptAt(keras.callbacks.Callback):
    """Raises `Interrupt(epoch)` at the start of epoch `epoch`, once."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            self.epoch = None  # once: a resumed fit with this callback goes on
            raise Interrupt(epoch)
