"""One way to make MirroredStrategies in tests, shared by every test module.

Each MirroredStrategy numbers its collective group keys from
`1 + MirroredStrategy._collective_key_base` (0) and its instance keys from a
fixed start, while TF's collective executor remembers a group key's size and
an instance's shape for the whole process. A second strategy in the same
process then aborts ("joining a group with size4, but that group has size 2",
or "Shape mismatch in the collective instance 100"). TF reserves the class
attribute for tests: every strategy made here gets its own key range.
"""

import itertools

import tensorflow as tf

_keys = itertools.count(1)


def mirrored(n):
    """MirroredStrategy over the first `n` logical CPUs (see conftest.py)."""
    cls = tf.distribute.MirroredStrategy
    saved = cls._collective_key_base
    cls._collective_key_base = 100_000 * next(_keys)
    try:
        return cls([f"/cpu:{i}" for i in range(n)])
    finally:
        cls._collective_key_base = saved
