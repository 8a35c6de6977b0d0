"""Runs in a fresh virtual environment with only the built wheel (and the
dependencies it declares) installed, outside the source tree: the package
imports from the environment, its version is the metadata's, and a short SAM
fit equals a hand-written SAM step."""

import importlib.metadata
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402

assert keras_sam.__file__.startswith(sys.prefix), f"not the wheel's: {keras_sam.__file__}"
assert importlib.metadata.version("keras_sam") == keras_sam.__version__

rng = np.random.default_rng(0)
x = rng.normal(size=(16, 3)).astype("float32")
y = rng.normal(size=(16, 1)).astype("float32")
inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
w0 = [v.numpy().astype("float64") for v in inner.weights]
model = keras_sam.SAMModel(inner, rho=0.1)
model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)


def grad(w, b):
    r = x @ w + b - y
    return 2 * x.T @ r / r.size, 2 * r.mean(axis=0)


w, b = w0
g = grad(w, b)
norm = np.sqrt(sum(np.sum(t * t) for t in g))
gw, gb = grad(w + 0.1 * g[0] / norm, b + 0.1 * g[1] / norm)
expected = [w - 0.1 * gw, b - 0.1 * gb]
for got, want in zip(inner.weights, expected):
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
print(
    f"wheel check: keras_sam {keras_sam.__version__} from {os.path.dirname(keras_sam.__file__)}, "
    "one SAM step equals the hand-written step"
)
