"""The small regression task the growing-batch tests train through `fit`
(test_adaptive_batch_size.py, test_batch_size_on_plateau.py): its data, its
tf.data pipelines by batch size, and the MLP."""

import keras
import numpy as np

N, D = 192, 6


def data():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, D)).astype("float32")
    y = (np.tanh(x @ rng.normal(size=D)) + 0.3 * rng.normal(size=N)).astype("float32")
    return x, y[:, None]


def dataset_fn(batch_size):
    """The whole data set in batches of `batch_size` (last partial one dropped)."""
    import tensorflow as tf

    x, y = data()
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size, drop_remainder=True)


def mlp(seed=0):
    """Dense(16, relu) -> Dense(1), its weights drawn from `seed`."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((D,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
