"""Random weight perturbation (`RWPModel`) and Flat-LoRA (`FlatLoRAModel`)
against float64 NumPy replays of the official code's formulas, with the same
noise (`standard_normals(step)`), on a softmax-regression model whose
gradient has a closed form. (Other backends: tests/backends/test_backends.py; KerasHub
task models: tests/integration/test_fine_tuning.py.)
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from strategies import mirrored

import keras_sam

N, D, K, BATCH, LR = 16, 5, 3, 8, 0.2


def data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N, D)).astype("float32"), rng.integers(0, K, size=(N,))


def softmax_regression(seed=0, lora_rank=None):
    inner = keras.Sequential([keras.Input((D,)), keras.layers.Dense(K)])
    rng = np.random.default_rng(seed)
    for v in inner.weights:
        v.assign(rng.normal(scale=0.5, size=v.shape).astype("float32"))
    if lora_rank:
        dense = inner.layers[0]
        dense.enable_lora(lora_rank, lora_alpha=2 * lora_rank)  # s = 2
        # B starts at zero in Keras (and in PEFT); a non-zero B lets A move.
        for v in (dense.lora_kernel_a, dense.lora_kernel_b):
            v.assign(rng.normal(scale=0.3, size=v.shape))
    return inner


def compile_sgd(model):
    model.compile(
        optimizer=keras.optimizers.SGD(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def logits_grad(xb, yb, kernel, bias):
    """d(mean cross-entropy)/d(logits) in float64, and the loss."""
    z = xb @ kernel + bias
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    onehot = np.eye(K)[yb]
    return (p - onehot) / len(xb)


def n64(t):
    return np.asarray(keras.ops.convert_to_numpy(t), np.float64)


def filter_std(w, rho):
    """The official ARWP rule, in PyTorch's layout (output filter first)."""
    if w.ndim == 1:
        return rho * np.linalg.norm(w)
    torch_layout = w.T  # (out, in)
    return (rho * np.linalg.norm(torch_layout.reshape(len(torch_layout), -1), axis=1)).T


@pytest.mark.parametrize("clean_weight", [0.0, 0.5])
def test_rwp_matches_a_float64_replay_of_the_official_update(clean_weight):
    x, y = data()
    rho = 0.3
    model = compile_sgd(
        keras_sam.RWPModel(softmax_regression(), rho=rho, clean_weight=clean_weight, seed=5)
    )
    w, b = (n64(v) for v in model.trainable_variables)
    steps = 0
    for _ in range(2):
        for s in range(0, N, BATCH):
            xb, yb = x[s : s + BATCH].astype(np.float64), y[s : s + BATCH]
            z = [n64(t) for t in model.standard_normals(steps)]
            wn, bn = w + filter_std(w, rho) * z[0], b + filter_std(b, rho) * z[1]
            d = logits_grad(xb, yb, wn, bn)
            g = [xb.T @ d, d.sum(axis=0)]
            if clean_weight:
                dc = logits_grad(xb, yb, w, b)
                g = [
                    (1 - clean_weight) * gi + clean_weight * ci
                    for gi, ci in zip(g, [xb.T @ dc, dc.sum(axis=0)])
                ]
            w, b = w - LR * g[0], b - LR * g[1]
            steps += 1
    history = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    np.testing.assert_allclose(n64(model.trainable_variables[0]), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(n64(model.trainable_variables[1]), b, rtol=1e-5, atol=1e-6)
    assert history.history["rho"] == pytest.approx([rho, rho])
    assert "sharpness" not in history.history


def test_the_noise_is_new_every_step_and_a_function_of_seed_and_step():
    model = keras_sam.RWPModel(softmax_regression(), seed=3)
    again = keras_sam.RWPModel(softmax_regression(), seed=3)
    other = keras_sam.RWPModel(softmax_regression(), seed=4)
    z0, z1 = (n64(model.standard_normals(s)[0]) for s in (0, 1))
    np.testing.assert_array_equal(n64(again.standard_normals(0)[0]), z0)
    assert not np.allclose(z0, z1)
    assert not np.allclose(n64(other.standard_normals(0)[0]), z0)
    # The draws of one step: one per weight, independent of each other.
    assert [tuple(t.shape) for t in model.standard_normals(0)] == [(D, K), (K,)]


def test_the_noise_is_standard_normal_and_the_same_under_xla():
    """TensorFlow's stateless normal ops draw other numbers under XLA; the
    noise must not (the replay, and a run with `jit_compile`, draw it too)."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("XLA through tf.function: TensorFlow's")
    model = keras_sam.RWPModel(softmax_regression(), seed=2)
    eager = [n64(t) for t in model.standard_normals(7)]
    compiled = tf.function(lambda s: model.standard_normals(s), jit_compile=True)
    for a, b in zip(eager, compiled(tf.constant(7))):
        np.testing.assert_allclose(n64(b), a, rtol=1e-5, atol=1e-6)
    many = n64(keras_sam.models._weight_noise.standard_normals([(200_000,)], 1, 0)[0])
    assert abs(many.mean()) < 0.01 and abs(many.std() - 1) < 0.01
    assert abs(np.mean(many**4) - 3) < 0.05  # Gaussian tails (kurtosis 3)


def test_embedding_tables_get_noise_per_token():
    """An Embedding's filter is one token's row (PyTorch's first axis)."""
    inner = keras.Sequential(
        [keras.Input((4,), dtype="int32"), keras.layers.Embedding(10, 6), keras.layers.Dense(2)]
    )
    table = inner.layers[0].embeddings
    table.assign(np.tile(np.arange(1, 11, dtype="float32")[:, None], (1, 6)))  # rows of norms
    model = compile_sgd(keras_sam.RWPModel(inner, rho=0.5, seed=0))
    z = model.standard_normals(0)[0]
    noise = keras_sam.rules.rwp_noise([z], [table.value], 0.5, [0])[0]
    expected = 0.5 * np.sqrt(6) * np.arange(1, 11)[:, None] * n64(z)
    np.testing.assert_allclose(n64(noise), expected, rtol=1e-6)


def flat_lora_replay(model, x, y, rho, ramp_steps, epochs):
    """Flat-LoRA's update (nblt/Flat-LoRA `training_step`) in float64: noise
    `factor * rho / sqrt(n) * ||row of W + s B A||` on W, the gradient of A
    and B at `W + noise + s B A`, SGD on A, B and the bias."""
    dense = model.inner.layers[0]
    w = n64(dense._kernel)
    a, b, bias = n64(dense.lora_kernel_a), n64(dense.lora_kernel_b), n64(dense.bias)
    s = dense.lora_alpha / dense.lora_rank
    step = 0
    for _ in range(epochs):
        for start in range(0, N, BATCH):
            xb, yb = x[start : start + BATCH].astype(np.float64), y[start : start + BATCH]
            factor = 0.5 * (1 - np.cos(min(step / ramp_steps, 1.0) * np.pi))
            torch_merged = (w + s * a @ b).T  # (out, in) as nn.Linear keeps it
            row_norm = np.linalg.norm(torch_merged, axis=1, keepdims=True)
            std = factor * rho / np.sqrt(torch_merged.shape[1]) * row_norm
            noise = (std * n64(model.standard_normals(step)[0]).T).T
            d = logits_grad(xb, yb, w + noise + s * a @ b, bias)
            g_kernel = xb.T @ d
            a, b, bias = (
                a - LR * s * g_kernel @ b.T,
                b - LR * s * a.T @ g_kernel,
                bias - LR * d.sum(axis=0),
            )
            step += 1
    return w, a, b, bias


def test_flat_lora_matches_a_float64_replay_and_leaves_the_frozen_weight_bitwise_equal():
    x, y = data(1)
    inner = softmax_regression(lora_rank=2)
    frozen = inner.layers[0]._kernel.numpy().copy()
    model = compile_sgd(keras_sam.FlatLoRAModel(inner, rho=0.5, ramp_steps=3, seed=11))
    w, a, b, bias = flat_lora_replay(model, x, y, rho=0.5, ramp_steps=3, epochs=2)
    history = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    dense = inner.layers[0]
    np.testing.assert_array_equal(dense._kernel.numpy(), frozen)
    np.testing.assert_allclose(n64(dense.lora_kernel_a), a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(n64(dense.lora_kernel_b), b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(n64(dense.bias), bias, rtol=1e-5, atol=1e-6)
    # The logged radius: factor(step) * rho averaged over each epoch's steps.
    factors = [0.5 * (1 - np.cos(min(t / 3, 1.0) * np.pi)) for t in range(4)]
    expected = [0.5 * np.mean(factors[:2]), 0.5 * np.mean(factors[2:])]
    assert history.history["rho"] == pytest.approx(expected, rel=1e-6)
    assert len(model.trainable_variables) == 3  # A, B, the bias


def test_flat_lora_perturbs_the_noise_the_replay_predicts_for_einsum_dense():
    """EinsumDense with LoRA: the merged kernel is `(..., out)`; one output
    unit's noise has std `rho / sqrt(prod(shape[:-1])) * ||unit||`."""
    layer = keras.layers.EinsumDense("btd,ndh->btnh", output_shape=(None, 2, 3))
    layer.build((None, 4, 5))
    merged = np.random.default_rng(0).normal(size=(2, 5, 3))
    z = np.random.default_rng(1).normal(size=(2, 5, 3))
    noise = n64(keras_sam.rules.flat_lora_noise(z, merged, 0.4))
    norms = np.linalg.norm(merged.reshape(10, 3), axis=0)
    np.testing.assert_allclose(noise, 0.4 / np.sqrt(10) * norms * z, rtol=1e-6)


@pytest.mark.parametrize("kind", ["rwp", "flat_lora"])
def test_rho_zero_is_plain_keras_exactly(kind):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(24, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, size=(24,))

    def run(wrap):
        keras.utils.set_random_seed(0)
        inner = keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                keras.layers.Conv2D(4, 3, activation="relu"),
                keras.layers.BatchNormalization(),
                keras.layers.Dropout(0.3, seed=1),
                keras.layers.Flatten(),
                keras.layers.Dense(3),
            ]
        )
        if kind == "flat_lora":
            inner.layers[-1].enable_lora(2)
        model = inner
        if wrap:
            cls = keras_sam.RWPModel if kind == "rwp" else keras_sam.FlatLoRAModel
            model = cls(inner, rho=0.0)
        model.compile(
            optimizer=keras.optimizers.Adam(0.01),
            metrics=["accuracy"],
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        h = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        return inner, h.history

    plain, hp = run(False)
    wrapped, hw = run(True)
    for a, b in zip(plain.variables, wrapped.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert hp["loss"] == hw["loss"] and hp["accuracy"] == hw["accuracy"]


@pytest.mark.parametrize("kind", ["rwp", "flat_lora"])
def test_two_replicas_draw_the_same_noise_and_equal_one_device(kind):
    x, y = data(2)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)

    def run(strategy):
        with strategy.scope():
            if kind == "rwp":
                model = keras_sam.RWPModel(softmax_regression(), rho=0.3, seed=1)
            else:
                model = keras_sam.FlatLoRAModel(softmax_regression(lora_rank=2), rho=0.5, seed=1)
            compile_sgd(model)
        history = model.fit(ds, epochs=2, verbose=0)
        return model, history.history

    one, h1 = run(tf.distribute.get_strategy())
    two, h2 = run(mirrored(2))
    for a, b in zip(one.variables, two.variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    np.testing.assert_allclose(h2["loss"], h1["loss"], rtol=1e-5)


def test_save_load_and_resume_like_an_uninterrupted_run(tmp_path):
    """The noise depends on the seed (in the config) and the step count (in
    the optimizer), so a resumed run draws what the whole run drew."""
    x, y = data()

    def fresh():
        rho = keras_sam.schedules.CosineAnnealing(0.1, 0.3, epochs=2, steps_per_epoch=2)
        return compile_sgd(keras_sam.RWPModel(softmax_regression(), rho=rho, seed=9))

    whole = fresh()
    whole.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    part = fresh()
    part.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    part.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded) is keras_sam.RWPModel and loaded.seed == 9
    assert isinstance(loaded.rho, keras_sam.schedules.CosineAnnealing)
    loaded.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(whole.variables, loaded.variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)


def test_a_saved_flat_lora_model_predicts_as_before(tmp_path):
    """Keras merges `s A B` into the kernel when it saves a LoRA layer (and
    zeroes A and B when it loads one): the loaded model predicts what the
    trained one did, and the wrapper's config comes back."""
    x, y = data()
    model = compile_sgd(
        keras_sam.FlatLoRAModel(softmax_regression(lora_rank=2), rho=0.5, ramp_steps=4, seed=9)
    )
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded) is keras_sam.FlatLoRAModel
    assert (loaded.seed, loaded.ramp_steps, loaded.rho) == (9, 4, 0.5)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )


def test_flat_lora_without_lora_layers_fails_before_training():
    x, y = data()
    inner = softmax_regression()
    before = [v.numpy().copy() for v in inner.variables]
    model = compile_sgd(keras_sam.FlatLoRAModel(inner))
    expected = (
        "FlatLoRAModel perturbs the merged weights of Dense and EinsumDense layers with "
        "LoRA enabled, and found no layer with LoRA enabled in"
    )
    with pytest.raises(ValueError, match=expected):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    for v, b in zip(inner.variables, before):
        np.testing.assert_array_equal(v.numpy(), b)


def test_flat_lora_with_lora_on_an_embedding_only_says_what_it_found():
    inner = keras.Sequential(
        [
            keras.Input((3,), dtype="int32"),
            keras.layers.Embedding(10, 4, name="tokens"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ]
    )
    inner.get_layer("tokens").enable_lora(2)
    model = compile_sgd(keras_sam.FlatLoRAModel(inner))
    x = np.random.default_rng(0).integers(0, 10, size=(8, 3))
    expected = "found LoRA enabled only on Embedding 'tokens', which it does not perturb"
    with pytest.raises(ValueError, match=expected):
        model.fit(x, np.zeros(8, "int32"), batch_size=BATCH, epochs=1, verbose=0)


@pytest.mark.parametrize("cls", [keras_sam.RWPModel, keras_sam.FlatLoRAModel])
def test_seed_none_follows_pythons_random_module_as_documented(cls):
    """`seed=None` draws from Python's `random`, which set_random_seed seeds:
    the same seeds in the same order after it, different ones without it."""
    import random

    def seeds():
        return [cls(softmax_regression(lora_rank=2)).seed for _ in range(2)]

    keras.utils.set_random_seed(5)
    first = seeds()
    keras.utils.set_random_seed(5)
    assert seeds() == first  # the same order, the same seeds
    assert first[0] != first[1]  # two wrappers, two seeds
    inner = softmax_regression(lora_rank=2)  # Keras' initializers draw from `random` too
    random.seed(5)
    assert cls(inner).seed == random.Random(5).randint(0, 2**31 - 1)
    assert "keras.utils.set_random_seed(s)` seeds that module too" in " ".join(cls.__doc__.split())


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (keras_sam.RWPModel, dict(rho=-0.1), "rho"),
        (keras_sam.RWPModel, dict(rho="big"), "rho"),
        (keras_sam.RWPModel, dict(clean_weight=1.0), "clean_weight"),
        (keras_sam.RWPModel, dict(seed=-1), "seed"),
        (keras_sam.RWPModel, dict(sam_every=2), "sam_every"),
        (keras_sam.FlatLoRAModel, dict(ramp_steps=0), "ramp_steps"),
        (keras_sam.FlatLoRAModel, dict(adaptive=True), "adaptive"),
        (keras_sam.FlatLoRAModel, dict(sub_batch_size=4), "sub_batch_size"),
    ],
)
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(softmax_regression(lora_rank=2), **kwargs)
