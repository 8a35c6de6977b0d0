"""The gradient of a model's loss by the backend's own autodiff of
`stateless_call` (TensorFlow's GradientTape, `jax.grad`, torch.autograd),
independently of keras_sam: the reference of the hand-written steps in
test_fine_tuning.py and test_multi_optimizer.py."""

import keras
import numpy as np


def backend_gradient(model, loss, x, y):
    """`d loss(y, model(x, training=True)) / d trainable weights`, float64
    NumPy arrays in `model.trainable_variables` order."""
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]
    x = keras.tree.map_structure(keras.ops.convert_to_tensor, x)
    y = keras.ops.convert_to_tensor(y)

    def loss_fn(values):
        y_pred, _ = model.stateless_call(values, ntv, x, training=True)
        return loss(y, y_pred)

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        values = [tf.convert_to_tensor(t) for t in tv]
        with tf.GradientTape() as tape:
            tape.watch(values)
            value = loss_fn(values)
        grads = tape.gradient(value, values)
    elif backend == "jax":
        import jax

        grads = jax.grad(loss_fn)(tv)
    else:
        import torch

        values = [t.detach().clone().requires_grad_(True) for t in tv]
        grads = torch.autograd.grad(loss_fn(values), values)
    return [np.asarray(keras.ops.convert_to_numpy(g)).astype(np.float64) for g in grads]
