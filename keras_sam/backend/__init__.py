"""The backend-specific math of keras_sam: how to take a gradient, how to
compile a function, and how replicas talk to each other.

The SAM step (`keras_sam.models`, `keras_sam.rules`) and the sharpness
measures (`keras_sam.sharpness`) are written with `keras.ops` and call these
functions wherever TensorFlow, JAX and PyTorch differ; no other module imports
`jax` or `torch`, or builds a `tf.function` / `jax.jit`. Outside this package,
code depends on the backend only where Keras' own API does:
`keras_sam.models` picks Keras' stateless `train_step` / `test_step` signature
on JAX (the stateful one elsewhere), and `keras_sam._keras_compat` reads and
replaces the extra attributes of TensorFlow's epoch iterator (its distributed
dataset). `tf.data`, which Keras uses for input pipelines on every backend, is
also used by `keras_sam.models` and `keras_sam.callbacks.batch_size_scheduler`.

Each backend module exports the same names:

- `value_and_grad(fn)`: `fn(values, *args) -> (value, aux)` becomes
  `g(values, *args) -> ((value, aux), grads)`, with `grads` a list matching
  `values` (zeros for values the value does not depend on).
- `hessian_vector_product(fn, values, vector)`: `H(values) @ vector` for
  `fn(values) -> scalar`.
- `compile(fn)`: `fn` compiled once per input signature (a `tf.function`
  without autograph on TensorFlow, `jax.jit` on JAX, `fn` itself on PyTorch).
  Used by `keras_sam.sharpness` (Keras compiles the training step itself).
- `num_replicas()`: replicas taking part in the current step (1 outside a
  `tf.distribute` replica context).
- `all_reduce(tensors, reduction)`: `"sum"` or `"mean"` over those replicas
  (identity with one replica).
- `read_values(variables)`: the variables' current values as tensors.
- `no_grad()`: a context for in-place updates (torch's `no_grad`).
- `random_state()` / `set_random_state(state)`: the backend's global random
  state, for layers that draw from it (torch's unseeded Dropout), so both
  passes of a step see the same random numbers (no-ops elsewhere).
- `standard_normal(shape, seed, dtype)`: Gaussian draws from a seed pair (an
  int32 tensor of shape (2,)), the same numbers however the step is compiled
  (RWP's and Flat-LoRA's noise).
- `replica_loss(loss)`: a replica's share of the global mean loss (Keras'
  TensorFlow trainer divides by the replica count itself; JAX's `per_device`
  step does it here).
- `keras_loss_share(value)`: a batch-mean term (MESA's distillation loss)
  scaled as Keras' compiled loss is on this replica, to be added to it.
- JAX only: `batch_devices_without_per_device_step()` (the batch axis of a
  `ModelParallel` mesh), `per_device_mesh()` and `per_device(fn, mesh, axis, replicated,
  sharded)`, the per-device step under `keras.distribution.DataParallel`.
- `loop_over(n, body, carry)`: `carry, out = body(i, carry)` for `i < n`,
  returning the last carry and the outputs concatenated along axis 0; `n`
  is an int, or on TensorFlow a tensor (a batch size unknown at trace time).
"""

import keras

_BACKEND = keras.backend.backend()

if _BACKEND == "tensorflow":
    from keras_sam.backend.tensorflow import *  # noqa: F401,F403
elif _BACKEND == "jax":
    from keras_sam.backend.jax import *  # noqa: F401,F403
elif _BACKEND == "torch":
    from keras_sam.backend.torch import *  # noqa: F401,F403
else:
    raise ImportError(
        f"keras_sam supports the tensorflow, jax and torch backends of Keras; "
        f"KERAS_BACKEND is {_BACKEND!r}."
    )
