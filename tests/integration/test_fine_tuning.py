"""Sharpness-aware fine-tuning of KerasHub task models (small configs, random
weights, offline): a causal LM (Gemma) and a text classifier (BERT), with and
without LoRA, wrapped in SAMModel, GSAMModel, SAMModel(sam_every=2),
FlatLoRAModel and RWPModel. Each wrapper's step equals a hand-written
reference step (the backend's own gradient of `stateless_call`, weights
moved by `assign` and put back, the method's formula in NumPy); frozen
weights stay bitwise equal; the task model generates, predicts and saves
after training; two replicas equal one device. JAX and PyTorch:
tests/cross_backend/test_fine_tuning_backends.py; JAX `ModelParallel` with the backbone's
layout map: tests/cross_backend/test_model_parallel.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from backend_gradient import backend_gradient
from other_backends import subprocess_env
from paths import ROOT
from strategies import mirrored

import keras_sam
from keras_sam import _keras_compat

if _keras_compat.keras_version() < (3, 15):
    pytest.skip("keras-hub 0.32 needs Keras >= 3.15", allow_module_level=True)
keras_hub = pytest.importorskip(
    "keras_hub", reason="keras-hub is an extra: pip install keras_sam[hub]"
)
from tiny_gemma import gemma_causal_lm  # noqa: E402  (after the keras-hub skip)
from tiny_gemma import numpy_weights  # noqa: E402

VOCAB, LENGTH, BATCH = 64, 10, 4
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def causal_lm(lora, seed=0):
    return gemma_causal_lm(VOCAB, lora, seed)


def classifier(lora, seed=0):
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        dropout=0.0,
        max_sequence_length=LENGTH,
    )
    model = keras_hub.models.BertTextClassifier(
        backbone, num_classes=3, preprocessor=None, dropout=0.0
    )
    if lora:
        backbone.enable_lora(rank=2)
    numpy_weights(model, seed)
    return model


def lm_data(n=BATCH, seed=0):
    ids = np.random.default_rng(seed).integers(1, VOCAB, size=(n, LENGTH + 1)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((n, LENGTH), bool)}
    return x, ids[:, 1:]


def classifier_data(n=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    x = {
        "token_ids": rng.integers(1, VOCAB, size=(n, LENGTH)).astype("int32"),
        "segment_ids": np.zeros((n, LENGTH), "int32"),
        "padding_mask": np.ones((n, LENGTH), bool),
    }
    return x, rng.integers(0, 3, size=(n,))


FAMILIES = {"causal_lm": (causal_lm, lm_data), "classifier": (classifier, classifier_data)}


def numpy(t):
    return np.asarray(keras.ops.convert_to_numpy(t))


def gradient(model, x, y):
    """The gradient of the loss in training mode, by the backend's own
    autodiff of `stateless_call` (independently of keras_sam), as NumPy."""
    return backend_gradient(model, LOSS, x, y)


def at(variables, values, fn):
    """`fn()` with `variables` holding `values`; their old values put back exactly."""
    saved = [numpy(v).copy() for v in variables]
    for v, value in zip(variables, values):
        v.assign(np.asarray(value, v.dtype))
    try:
        return fn()
    finally:
        for v, value in zip(variables, saved):
            v.assign(value)


def norm(arrays):
    return np.sqrt(sum(float(np.sum(a * a)) for a in arrays))


def reference_direction(method, model, x, y, step):
    """The descent direction of one step, hand-written in NumPy around the
    backend's gradient."""
    variables = model.trainable_variables
    g = gradient(model, x, y)
    if method == "sam_every2" and step % 2 == 1:
        return g  # a plain step between SAM steps
    if method == "flat_lora":
        return flat_lora_gradient(model, x, y, step)
    if method == "rwp":
        return rwp_gradient(model, x, y, step)
    rho = 0.05
    e = [rho * t / (norm(g) + 1e-12) for t in g]
    w = [numpy(v).astype(np.float64) for v in variables]
    gp = at(variables, [wi + ei for wi, ei in zip(w, e)], lambda: gradient(model, x, y))
    if method != "gsam":
        return gp
    # GSAM: gp minus alpha times g's part orthogonal to gp.
    alpha = 0.3
    coef = sum(float(np.sum(a * b)) for a, b in zip(g, gp)) / (norm(gp) ** 2 + 1e-12)
    return [p - alpha * (c - coef * p) for c, p in zip(g, gp)]


RWP = dict(rho=0.05, seed=6)


def rwp_gradient(model, x, y, step):
    """RWP: every trainable weight moved by the official filter-wise noise
    (std rho times each output unit's norm; PyTorch's filters are rows)."""
    draws = keras_sam.RWPModel(model, **RWP).standard_normals(step)
    noisy = []
    for v, z in zip(model.trainable_variables, draws):
        w = numpy(v).astype(np.float64)
        if w.ndim == 1:
            std = RWP["rho"] * np.linalg.norm(w)
        elif v.name == "embeddings":  # one token per filter
            std = RWP["rho"] * np.linalg.norm(w, axis=1, keepdims=True)
        else:  # one output unit (the last axis) per filter
            std = RWP["rho"] * np.linalg.norm(w.reshape(-1, w.shape[-1]), axis=0)
        noisy.append(w + std * numpy(z))
    return at(model.trainable_variables, noisy, lambda: gradient(model, x, y))


FLAT_LORA = dict(rho=0.3, seed=4)


def flat_lora_gradient(model, x, y, step):
    """Flat-LoRA: the frozen kernels moved by the official noise (relative
    to each output unit of the merged weight), the gradient taken there."""
    layers = keras_sam.models.rwp.lora_layers(model)
    wrapper = keras_sam.FlatLoRAModel(model, **FLAT_LORA)
    draws = wrapper.standard_normals(step)
    noisy = []
    for layer, z in zip(layers, draws):
        kernel = numpy(layer._kernel).astype(np.float64)
        s = layer.lora_alpha / layer.lora_rank
        merged = kernel + s * np.matmul(numpy(layer.lora_kernel_a), numpy(layer.lora_kernel_b))
        units = merged.reshape(-1, merged.shape[-1])
        std = FLAT_LORA["rho"] / np.sqrt(len(units)) * np.linalg.norm(units, axis=0)
        noisy.append(kernel + std * numpy(z))
    return at([layer._kernel for layer in layers], noisy, lambda: gradient(model, x, y))


def wrap(method, model):
    if method == "sam":
        return keras_sam.SAMModel(model, rho=0.05)
    if method == "gsam":
        return keras_sam.GSAMModel(model, rho=0.05, alpha=0.3)
    if method == "sam_every2":
        return keras_sam.SAMModel(model, rho=0.05, sam_every=2)
    if method == "rwp":
        return keras_sam.RWPModel(model, **RWP)
    return keras_sam.FlatLoRAModel(model, **FLAT_LORA)


CASES = [
    ("causal_lm", True, "sam"),
    ("causal_lm", True, "gsam"),
    ("causal_lm", True, "sam_every2"),
    ("causal_lm", True, "flat_lora"),
    ("causal_lm", True, "rwp"),
    ("causal_lm", False, "sam"),
    ("classifier", True, "sam"),
    ("classifier", True, "flat_lora"),
    ("classifier", False, "gsam"),
]


@pytest.mark.parametrize(
    "family, lora, method", CASES, ids=[f"{f}-{'lora' if lo else 'full'}-{m}" for f, lo, m in CASES]
)
def test_each_step_equals_a_hand_written_step_and_frozen_weights_stay(family, lora, method):
    build, make_data = FAMILIES[family]
    x, y = make_data()
    steps = 2

    # SGD with momentum: Adam's per-coordinate scaling would turn float32
    # rounding of a near-zero gradient entry into a visible difference.
    reference = build(lora)
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    for step in range(steps):
        direction = reference_direction(method, reference, x, y, step)
        direction = [keras.ops.convert_to_tensor(d.astype("float32")) for d in direction]
        optimizer.apply(direction, reference.trainable_variables)

    model = build(lora)
    frozen = [numpy(v).copy() for v in model.non_trainable_variables]
    trained_names = {v.path for v in model.trainable_variables}
    wrapper = wrap(method, model)
    wrapper.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=LOSS)
    wrapper.fit(x, y, batch_size=BATCH, epochs=steps, shuffle=False, verbose=0)

    if lora:  # LoRA: only the adapters (and heads, biases left trainable) train
        assert all(
            "lora_kernel" in n or not n.endswith("kernel") or "logits" in n
            for n in trained_names
            if "attention" in n
        )
    for v, before in zip(model.non_trainable_variables, frozen):
        np.testing.assert_array_equal(numpy(v), before, err_msg=v.path)
    for got, want in zip(model.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(numpy(got), numpy(want), rtol=1e-5, atol=1e-6, err_msg=got.path)


def test_lora_trains_a_small_share_of_the_weights():
    full, adapted = causal_lm(lora=False), causal_lm(lora=True)
    count = lambda vs: sum(int(np.prod(v.shape)) for v in vs)  # noqa: E731
    assert count(adapted.trainable_variables) < count(full.trainable_variables) / 10
    assert all("lora_kernel" in v.path for v in adapted.trainable_variables)


def test_the_trained_model_generates_predicts_and_reloads(tmp_path):
    lm = causal_lm(lora=True)
    x, y = lm_data(8)
    model = keras_sam.GSAMModel(lm, rho=0.05)
    model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss=LOSS)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)

    logits = model.predict(x, verbose=0)
    np.testing.assert_allclose(logits, lm.predict(x, verbose=0), rtol=1e-6)
    prompt = {"token_ids": x["token_ids"][:2].copy(), "padding_mask": np.zeros((2, LENGTH), bool)}
    prompt["padding_mask"][:, :4] = True
    out = lm.generate(prompt, stop_token_ids=None)  # greedy by default
    first = lm.predict(
        {"token_ids": x["token_ids"][:2, :4], "padding_mask": np.ones((2, 4), bool)}, verbose=0
    )[:, -1].argmax(-1)
    np.testing.assert_array_equal(out["token_ids"][:, 4], first)

    lm.save(tmp_path / "lm.keras")  # Keras merges s A B into each kernel
    loaded = keras.models.load_model(tmp_path / "lm.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["sam", "sam_synced", "flat_lora"])
def test_two_replicas_equal_one_device(method):
    """Per replica (default): each replica perturbs with its half of the
    batch, as `num_batch_splits=2` does on one device; synced: the global
    batch's perturbation; Flat-LoRA: the same noise on both."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("MirroredStrategy is TensorFlow's")
    x, y = lm_data(8)
    # A bool padding mask fails under MirroredStrategy in plain Keras too
    # (TensorFlow's AddN has no bool kernel); KerasHub reads an int32 one.
    x["padding_mask"] = x["padding_mask"].astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)

    def make(strategy, splits):
        with strategy.scope():
            lm = causal_lm(lora=True)
            if method == "flat_lora":
                model = keras_sam.FlatLoRAModel(lm, **FLAT_LORA)
            else:
                model = keras_sam.SAMModel(
                    lm, rho=0.05, sync_perturbation=method == "sam_synced", num_batch_splits=splits
                )
            model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss=LOSS)
        model.fit(ds, epochs=2, verbose=0)
        return lm

    one = make(tf.distribute.get_strategy(), 2 if method == "sam" else None)
    two = make(mirrored(2), None)
    for a, b in zip(one.weights, two.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


# ------------------------------------------------- examples/fine_tune_lora.py
def _lora_example():
    import importlib.util
    import os

    path = os.path.join(ROOT, "examples", "fine_tune_lora.py")
    spec = importlib.util.spec_from_file_location("example_fine_tune_lora", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--epochs", "2", "--examples", "32", "--batch-size", "16", "--sequence-length", "8"]
TINY += ["--size", "1", "16", "2", "--rank", "2", "--pretrain-epochs", "1"]


@pytest.mark.parametrize("method", ["adamw", "sam", "gsam", "flat_lora"])
def test_the_lora_example_trains_checkpoints_and_logs(tmp_path, method):
    example = _lora_example()
    history = example.main(TINY + ["--method", method, "--out", str(tmp_path)])
    logs = history.history
    assert len(logs["loss"]) == 2 and "sparse_categorical_accuracy" in logs
    if method != "adamw":
        assert {"grad_norm", "rho"} <= set(logs)
    if method == "flat_lora":  # the cosine ramp over the 4 steps: 0 -> 1
        factors = [(1 - np.cos(np.pi * t / 4)) / 2 for t in range(4)]
        assert logs["rho"] == pytest.approx(
            [0.05 * np.mean(factors[:2]), 0.05 * np.mean(factors[2:])], rel=1e-5
        )
    assert (tmp_path / "fine_tuned.weights.h5").exists()
    assert list((tmp_path / "logs").rglob("*.tfevents*"))


@pytest.mark.parametrize("method", ["flat_lora", "sam"])
def test_the_lora_example_visibly_learns_the_new_task(tmp_path, capsys, method):
    """The defaults, as a user runs them: the pretrained model (counting up)
    scores at most 0.3 on counting down, the LoRA fine-tune at least 0.8,
    and its greedy continuation of a held-out prompt is the right one."""
    history = _lora_example().main(["--method", method, "--out", str(tmp_path)]).history
    accuracy = history["held_out_accuracy"]
    assert accuracy["before"] <= 0.3 and accuracy["after"] >= 0.8, accuracy
    continuation = history["continuation"]
    assert continuation["generated"] == continuation["right"], continuation
    out = capsys.readouterr().out
    assert f"before fine-tuning: held-out accuracy on counting down {accuracy['before']:.2f}" in out
    assert f"after fine-tuning:  held-out accuracy on counting down {accuracy['after']:.2f}" in out
    assert f"continued    {continuation['generated']} (right)" in out


@pytest.mark.parametrize(
    "args, match",
    [
        (["--sequence-length", "5"], "--sequence-length"),
        (["--pretrain-epochs", "0"], "--pretrain-epochs"),
        (["--rank", "0"], "--rank"),
        (["--rho", "-1"], "--rho"),
        (["--text-file", "x.txt"], "--preset"),
        (["--size", "2", "10", "3"], "--size"),
    ],
)
def test_the_lora_example_refuses_bad_arguments(args, match):
    with pytest.raises(SystemExit, match=match):
        _lora_example().main(args)


# ---------------------------------------- memory: benchmarks/fine_tuning_cost.py
def test_flat_lora_keeps_no_copy_of_the_frozen_weights(tmp_path):
    """XLA's temporaries of Flat-LoRA's compiled step (JAX) against plain
    AdamW with LoRA: the noise on the merged weights lives only as long as
    the forward pass needs the merged weights anyway, so no buffer the size
    of the adapted kernels (let alone of all frozen weights) is added."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("a JAX subprocess: run once, from the TensorFlow process")
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    root = ROOT
    out = tmp_path / "cost.json"
    env = subprocess_env("jax")
    cmd = [sys.executable, os.path.join(root, "benchmarks", "fine_tuning_cost.py")]
    cmd += ["--sizes", "small", "--methods", "adamw_lora", "flat_lora"]
    cmd += ["--steps", "1", "--repeats", "1", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())["sizes"]["small"]["rows"]}
    # Half the adapted kernels' bytes: far below one copy of them.
    adapted = rows["flat_lora"]["adapted_kernel_bytes"]
    assert 0 < adapted < rows["flat_lora"]["frozen_bytes"]
    assert rows["flat_lora"]["temp"] - rows["adamw_lora"]["temp"] <= adapted / 2
    assert rows["flat_lora"]["stored"] == rows["adamw_lora"]["stored"]  # nothing stored
