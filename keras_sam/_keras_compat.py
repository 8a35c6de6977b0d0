"""The only module of keras_sam that touches private Keras attributes.

Each access is named after what it reads, so a Keras release that moves an
attribute breaks here, in one place, with a message that says so.
"""

import keras

TESTED_KERAS_VERSIONS = ((3, 10), (3, 15))
"""Inclusive range of Keras minor versions the test suite pins."""


def keras_version():
    return tuple(int(p) for p in keras.__version__.split(".")[:2])


def check_keras_version(feature):
    """Raises a clear error when `feature` runs on an untested Keras."""
    low, high = TESTED_KERAS_VERSIONS
    if not (low <= keras_version() <= high):
        raise RuntimeError(
            f"{feature} relies on Keras internals tested with Keras "
            f"{low[0]}.{low[1]} to {high[0]}.{high[1]}; this is Keras "
            f"{keras.__version__}. Install a tested version "
            f"(pip install 'keras>={low[0]}.{low[1]},<{high[0]}.{high[1] + 1}')."
        )


def learning_rate_schedule(optimizer):
    """The optimizer's learning rate as given: a float, variable or schedule."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner._learning_rate
