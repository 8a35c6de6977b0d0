"""The guide's worked example (examples/layerwise_sam.py, a method keras_sam
does not ship, written on `TwoGradientModel`'s contract): its steps equal a
NumPy float64 replay, it saves and loads, and the guide shows its code as it
is. tests/cross_backend/test_custom_method_backends.py reruns this module on JAX and PyTorch."""

import os
import re

import keras
import numpy as np
from layerwise_sam import LayerwiseSAM
from paths import ROOT

import keras_sam

B, D, H = 8, 3, 4
LR, RHO, HEAD_RHO = 0.1, 0.2, 0.05


def make_inner():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(H, activation="relu", name="body"),
            keras.layers.Dense(2, name="head"),
        ]
    )


def data():
    rng = np.random.default_rng(3)
    return rng.normal(size=(3 * B, D)).astype("float32"), rng.normal(size=(3 * B, 2)).astype(
        "float32"
    )


def gradients(w, x, y):
    """The MSE gradient of the two-layer ReLU network, float64, by hand."""
    k1, b1, k2, b2 = w
    z = x @ k1 + b1
    h = np.maximum(z, 0)
    out = h @ k2 + b2
    d_out = 2 * (out - y) / out.size
    d_h = d_out @ k2.T * (z > 0)
    return [x.T @ d_h, d_h.sum(0), h.T @ d_out, d_out.sum(0)]


def replay(w, x, y, steps):
    """LayerwiseSAM with SGD, written out: per-layer radius and norm."""
    w = [np.asarray(a, "float64") for a in w]
    for i in range(steps):
        xb, yb = x[i * B : (i + 1) * B].astype("float64"), y[i * B : (i + 1) * B].astype("float64")
        g = gradients(w, xb, yb)
        e = []
        for rho, pair in ((RHO, g[:2]), (HEAD_RHO, g[2:])):
            norm = np.sqrt(sum(np.sum(p**2) for p in pair))
            e += [rho * p / (norm + 1e-12) for p in pair]
        gp = gradients([a + b for a, b in zip(w, e)], xb, yb)
        w = [a - LR * b for a, b in zip(w, gp)]
    return w


def test_layerwise_sam_steps_equal_the_numpy_replay():
    x, y = data()
    inner = make_inner()
    start = [v.numpy() for v in inner.trainable_variables]
    model = LayerwiseSAM(inner, rho=RHO, layer_rho={"head": HEAD_RHO})
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    model.fit(x, y, batch_size=B, epochs=1, verbose=0, shuffle=False)
    expected = replay(start, x, y, steps=3)
    for v, ref in zip(inner.trainable_variables, expected):
        np.testing.assert_allclose(v.numpy(), ref, rtol=1e-5, atol=1e-6, err_msg=v.path)
    # The head's own radius changes the result: the per-layer rule is in effect.
    moved = [a - b for a, b in zip(expected, start)]
    assert all(np.any(m != 0) for m in moved)


def test_one_radius_for_every_layer_differs_from_sam_by_the_norm():
    """Per-layer normalization is not SAM's global one: with one radius and
    two layers, LayerwiseSAM and SAMModel take different steps."""
    x, y = data()
    results = []
    for make in (lambda m: LayerwiseSAM(m, rho=RHO), lambda m: keras_sam.SAMModel(m, rho=RHO)):
        inner = make_inner()
        model = make(inner)
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
        model.fit(x[:B], y[:B], batch_size=B, epochs=1, verbose=0)
        results.append(np.concatenate([v.numpy().ravel() for v in inner.trainable_variables]))
    assert np.max(np.abs(results[0] - results[1])) > 1e-6


def test_layerwise_sam_saves_and_loads(tmp_path):
    x, y = data()
    model = LayerwiseSAM(make_inner(), rho=RHO, layer_rho={"head": HEAD_RHO}, sam_every=2)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    model.fit(x, y, batch_size=B, epochs=1, verbose=0)
    path = str(tmp_path / "layerwise.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is LayerwiseSAM
    assert (loaded.rho, loaded.layer_rho, loaded.sam_every) == (RHO, {"head": HEAD_RHO}, 2)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_the_guide_shows_the_example_as_it_is():
    with open(os.path.join(ROOT, "examples", "layerwise_sam.py")) as f:
        source = f.read()
    method = re.search(r"# --8<-- \[start:method\]\n(.*?)\n+# --8<-- \[end:method\]", source, re.S)
    with open(os.path.join(ROOT, "docs", "custom-method.md")) as f:
        guide = f.read()
    assert method.group(1).strip() in guide
    lines = [line for line in method.group(1).strip().splitlines() if line.strip()]
    assert len(lines) <= 40, len(lines)
