"""LoRA fine-tunes that resume: Keras merges `s * A @ B` into a LoRA layer's
kernel when it saves and sets A and B to zero when it loads, which would
stop the adapters (both factors' gradients vanish at A = B = 0); the
wrappers save the factors too and put them back.

Oracle: the uninterrupted run. A run interrupted and resumed by
`BackupAndRestore`, or saved by `ModelCheckpoint` and continued after
`load_model`, ends where the uninterrupted run ends: every weight (frozen
kernels, LoRA factors, heads) and every optimizer variable within 1e-6,
for SAM, GSAM, Flat-LoRA and RWP with SGD (momentum) and AdamW. A Dense
stack here (JAX and PyTorch: tests/cross_backend/test_lora_resume_backends.py) and the
tiny KerasHub Gemma (this process's backend). A file saved by keras_sam
0.4, and a plain Keras LoRA model loaded then wrapped, train on with a
warning that names the zeroed layers.
"""

import os
import warnings

import keras
import numpy as np
import pytest
from interrupts import Interrupt
from interrupts import InterruptAt
from paths import DATA

import keras_sam
from keras_sam import _keras_compat

EPOCHS, AT, BATCH = 4, 2, 16

METHODS = {
    "sam": lambda m: keras_sam.SAMModel(m, rho=0.05),
    "gsam": lambda m: keras_sam.GSAMModel(m, rho=0.05, alpha=0.3),
    "flat_lora": lambda m: keras_sam.FlatLoRAModel(m, rho=0.3, seed=3),
    "rwp": lambda m: keras_sam.RWPModel(m, rho=0.05, seed=3),
}
OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adamw": lambda: keras.optimizers.AdamW(1e-2),
}


def numpy(v):
    return np.asarray(keras.ops.convert_to_numpy(v))


def numpy_weights(model, seed):
    """NumPy-drawn weights: the same numbers on every backend."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        v.assign(rng.normal(scale=0.3, size=v.shape).astype(v.dtype))


def dense_stack():
    """Two Dense layers with LoRA (rank 2) and a head without."""
    inner = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    inner.layers[0].enable_lora(2)
    inner.layers[1].enable_lora(2)
    numpy_weights(inner, 1)
    return inner


def dense_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    return x, np.tanh(x @ rng.normal(size=(6, 1))).astype("float32")


def make(method, optimizer, build=dense_stack, loss="mse"):
    model = METHODS[method](build())
    model.compile(optimizer=OPTIMIZERS[optimizer](), loss=loss)
    return model


def state(model):
    """Every model and optimizer variable: `[(path, value)]` in Keras' order
    (paths differ between models by their automatic names)."""
    return [(v.path, numpy(v)) for v in model.weights + model.optimizer.variables]


def assert_same_state(got, want):
    assert len(got) == len(want)
    for (_, a), (path, b) in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=path)


def lora_factors(model):
    return {v.path: numpy(v) for v in model.weights if "lora_" in v.path}


def resumed_by_backup_and_restore(tmp_path, build_model, x, y):
    backup = str(tmp_path / "backup")
    fit = dict(batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    with pytest.raises(Interrupt):
        build_model().fit(
            x, y, callbacks=[keras.callbacks.BackupAndRestore(backup), InterruptAt(AT)], **fit
        )
    resumed = build_model()
    resumed.fit(x, y, callbacks=[keras.callbacks.BackupAndRestore(backup)], **fit)
    return resumed


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("method", list(METHODS))
def test_dense_backup_and_restore_resumes_like_the_uninterrupted_run(tmp_path, method, optimizer):
    x, y = dense_data()
    full = make(method, optimizer)
    full.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    resumed = resumed_by_backup_and_restore(tmp_path, lambda: make(method, optimizer), x, y)
    assert_same_state(state(resumed), state(full))
    factors = lora_factors(full)
    assert len(factors) == 4 and all(np.any(a != 0) for a in factors.values())


@pytest.mark.parametrize("method", ["sam", "flat_lora"])
def test_dense_checkpoint_then_load_model_trains_the_adapters_on(tmp_path, method):
    x, y = dense_data()
    full = make(method, "adamw")
    full.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)

    path = str(tmp_path / "model.keras")
    first = make(method, "adamw")
    first.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=AT,
        shuffle=False,
        verbose=0,
        callbacks=[keras.callbacks.ModelCheckpoint(path)],
    )
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(first)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "A and B equal to zero"
        loaded.fit(
            x, y, batch_size=BATCH, epochs=EPOCHS, initial_epoch=AT, shuffle=False, verbose=0
        )
    assert_same_state(state(loaded), state(full))


def test_a_model_saved_by_0_4_loads_and_warns_that_its_adapters_were_reset():
    """tests/support/data/sam_lora_0_4.keras: a SAMModel whose first Dense has LoRA
    (rank 2), trained 2 epochs and saved by keras_sam 0.4.0 (Keras 3.15.1)."""
    if _keras_compat.keras_version() < (3, 15):
        pytest.skip(
            "the file was saved with Keras 3.15.1, whose layer configs Keras < 3.15 reads not"
        )
    loaded = keras.models.load_model(os.path.join(DATA, "sam_lora_0_4.keras"))
    assert type(loaded) is keras_sam.SAMModel and loaded.rho == 0.05
    data = np.load(os.path.join(DATA, "data_lora_0_4.npz"))
    expected = np.load(os.path.join(DATA, "sam_lora_0_4_predict.npy"))
    np.testing.assert_allclose(loaded.predict(data["x"], verbose=0), expected, rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match=r"LoRA layers \['dense'\] have both factors A and B"):
        loaded.fit(data["x"], data["y"], batch_size=8, epochs=1, verbose=0)


def test_a_plain_keras_lora_model_loaded_and_wrapped_warns(tmp_path):
    inner = dense_stack()
    inner.save(tmp_path / "plain.keras")  # Keras merges and zeroes A and B
    loaded = keras.models.load_model(tmp_path / "plain.keras")
    model = keras_sam.SAMModel(loaded, rho=0.05)
    model.compile(optimizer="sgd", loss="mse")
    x, y = dense_data()
    names = [layer.name for layer in loaded.layers[:2]]
    with pytest.warns(UserWarning, match=rf"LoRA layers {names!r}".replace("[", r"\[")):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)


def test_load_weights_into_other_lora_layers_is_refused(tmp_path):
    model = make("sam", "sgd")
    model.save_weights(tmp_path / "w.weights.h5")
    other = dense_stack()
    other.layers[2].enable_lora(1)  # a third LoRA layer
    wrapper = keras_sam.SAMModel(other, rho=0.05)
    with pytest.raises(ValueError, match="LoRA variables of 2 layer"):
        wrapper.load_weights(tmp_path / "w.weights.h5")


# ----------------------------------------------- the tiny KerasHub Gemma
@pytest.mark.parametrize("method", list(METHODS))
def test_gemma_backup_and_restore_resumes_like_the_uninterrupted_run(tmp_path, method):
    if _keras_compat.keras_version() < (3, 15):
        pytest.skip("keras-hub 0.32 needs Keras >= 3.15")
    pytest.importorskip("keras_hub", reason="keras-hub is an extra: pip install keras_sam[hub]")
    from tiny_gemma import gemma_causal_lm

    vocab, length = 32, 6
    ids = np.random.default_rng(0).integers(1, vocab, size=(2 * BATCH, length + 1)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((2 * BATCH, length), bool)}
    y = ids[:, 1:]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def build():
        return make(method, "adamw", lambda: gemma_causal_lm(vocab, lora=True), loss)

    full = build()
    full.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    resumed = resumed_by_backup_and_restore(tmp_path, build, x, y)
    assert_same_state(state(resumed), state(full))
