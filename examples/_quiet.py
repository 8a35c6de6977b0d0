"""Imports TensorFlow without the lines its C++ core writes to stderr.

TensorFlow 2.21 logs through absl before it reads `TF_CPP_MIN_LOG_LEVEL`, so
that variable no longer hides the start-up lines ("All log messages before
absl::InitializeLog()", oneDNN, "Could not find cuda drivers", and, when the
devices start, "failed call to cuInit" on a machine without a GPU). The
examples and the benchmark scripts call `import_tensorflow_quietly()` before
they import Keras: it points the process's stderr at /dev/null while
TensorFlow loads and starts its devices, then puts it back, so every later
message (Python warnings, errors, tracebacks) shows as usual. The library
itself changes neither stderr nor the environment.
"""

import importlib.util
import os


def import_tensorflow_quietly():
    """Imports TensorFlow (when installed) and lists its devices with
    stderr silenced, and keeps its later C++ INFO and WARNING lines off
    (`TF_CPP_MIN_LOG_LEVEL=2` unless set); nothing more without TensorFlow."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # C++ lines after start-up
    if importlib.util.find_spec("tensorflow") is None:
        return
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()  # starts the devices (cuInit)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
