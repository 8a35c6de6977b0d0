"""Test setup: four logical CPU devices so MirroredStrategy tests run on one CPU.

TensorFlow fixes its device list the first time it initializes, so this must run
before anything touches a device.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

NUM_LOGICAL_CPUS = 4

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS
    )
