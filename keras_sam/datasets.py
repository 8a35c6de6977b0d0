"""Small data sets that need no download, for examples, tests and benchmarks."""

import numpy as np


def mnist1d(num_samples=5000, seed=42):
    """MNIST-1D (Greydanus 2020), generated offline and deterministically.

    Ten classes of 1-D signals of length 40, made from templates by random
    padding, shear, scaling and noise; a real benchmark made to tell training
    methods apart on a CPU. Needs the `mnist1d` package
    (`pip install mnist1d`, part of `keras_sam[benchmarks]`).

    Args:
        num_samples: examples in total; 80% train, 20% test.
        seed: generation seed; the same seed gives the same arrays.

    Returns:
        `(x_train, y_train), (x_test, y_test)`: float32 arrays of shape
        `(n, 40, 1)` and int32 labels.

    Example:

    ```python
    (x, y), (x_test, y_test) = keras_sam.datasets.mnist1d()
    ```
    """
    try:
        from mnist1d.data import get_dataset_args
        from mnist1d.data import make_dataset
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "keras_sam.datasets.mnist1d needs the `mnist1d` package: pip install mnist1d"
        ) from error
    if not isinstance(num_samples, int) or num_samples < 10:
        raise ValueError(f"`num_samples` must be an int >= 10, got {num_samples!r}.")
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    data = make_dataset(args)

    def arrays(x, y):
        return np.asarray(x, np.float32)[..., None], np.asarray(y, np.int32)

    return arrays(data["x"], data["y"]), arrays(data["x_test"], data["y_test"])
