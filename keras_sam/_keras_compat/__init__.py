"""Every access keras_sam makes to private Keras code, in one package, split
by what it touches. Each module lists its accesses; CI runs the whole test
suite on the newest Keras and the library's tests on Keras 3.12, the range
`TESTED_KERAS_VERSIONS` below.

- `optimizers`: an optimizer's `_learning_rate` (as given: float, variable or
  schedule), a `MultiOptimizer`'s `_optimizer_map` (its default optimizer;
  Keras 3.15+), and the momentum buffers of SGD (`momentums`) and Adam
  (`_momentums`, `_get_variable_index`) that Momentum-SAM reads;
- `fit_loop`: the running `fit()`'s epoch iterator (read from its frame;
  Keras has no public route to it) and the attributes the batch-size swap
  writes, the progress bar's copies of the step count, the compiled
  metrics' `_direction` and `Trainer._symbolic_build` (the "auto" mode of
  `BatchSizeOnPlateau`), and, for the wrappers' own `train_step`, the
  `Trainer` members `_compute_loss` (the wrapper of `compute_loss` that
  Keras' own `train_step` calls) and `_loss_tracker` (the `Mean` behind the
  logged `"loss"`);
- `distribution`: how a multi-process `keras.distribution` splits `fit`'s
  batches (3.12's `_num_process`, `_is_multi_process`);
- `layers`: the recursive walk over a model's layers (`_flatten_layers`)
  and the backend's seed dtype.

Nothing here imports a keras_sam module: the rules that use these accesses
live with the features.
"""

import warnings

import keras

TESTED_KERAS_VERSIONS = ((3, 12), (3, 15))
"""Inclusive range of Keras minor versions the test suite runs on (CI runs the
whole suite on the oldest and on the newest)."""

_warned = set()


def keras_version():
    return tuple(int(p) for p in keras.__version__.split(".")[:2])


def check_keras_version(feature):
    """Checks that `feature` may use Keras internals on this Keras.

    Older than the tested range: a clear error. Newer: a warning (once), and
    the feature goes on; the attributes it needs are checked where they are
    read (`running_fit`), so a Keras that moved them fails with a message
    naming them, before training starts.
    """
    low, high = TESTED_KERAS_VERSIONS
    version = keras_version()
    tested = f"{low[0]}.{low[1]} to {high[0]}.{high[1]}"
    if version < low:
        raise RuntimeError(
            f"{feature} relies on Keras internals tested with Keras {tested}; "
            f"this is Keras {keras.__version__}. Install a tested version "
            f"(pip install 'keras>={low[0]}.{low[1]}')."
        )
    if version > high and feature not in _warned:
        _warned.add(feature)
        warnings.warn(
            f"{feature} relies on Keras internals tested with Keras {tested}; "
            f"this is Keras {keras.__version__}, newer. It checks what it needs "
            "before training and says so if something moved.",
            stacklevel=3,
        )
