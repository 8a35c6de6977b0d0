"""The examples users copy, run in this process on tiny sizes: fine-tuning a
keras.applications backbone, the Transformer text classifier, the rho search.

The TFDS data sets are replaced by `tfds.testing.mock_data` (random examples
with the real features), so nothing downloads."""

import glob
import importlib.util
import os

import keras
import numpy as np
import pytest
from paths import ROOT

import keras_sam

tfds = pytest.importorskip("tensorflow_datasets")


def _example(name):
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fine_tune = _example("fine_tune")
text_classifier = _example("text_classifier")
tune_rho = _example("tune_rho")


def _scalars(log_dir):
    """`{tag: [values by step]}` of the TensorBoard event files in `log_dir`."""
    from tensorboard.backend.event_processing import event_accumulator

    values = {}
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            events = sorted(acc.Tensors(tag), key=lambda e: e.step)
            values[tag] = [float(tf_make_ndarray(e.tensor_proto)) for e in events]
    return values


def tf_make_ndarray(proto):
    import tensorflow as tf

    return tf.make_ndarray(proto)


@pytest.mark.parametrize(
    "method, backbone", [("sam", "mobilenet_v3_small"), ("gsam", "mobilenet_v2")]
)
def test_fine_tune_backbone_with_the_batch_ramp_checkpoint_and_tensorboard(
    tmp_path, method, backbone
):
    out = str(tmp_path / "out")
    argv = [
        "--dataset",
        "cifar10",
        "--train-examples",
        "32",
        "--image-size",
        "32",
        "--epochs",
        "4",
        "--stages",
        "2",
        "--batch-size",
        "8",
        "--method",
        method,
        "--backbone",
        backbone,
        "--out",
        out,
    ]
    with tfds.testing.mock_data(num_examples=48):
        history = fine_tune.main(argv)
    logs = history.history
    assert logs["batch_size"] == [8, 8, 16, 16]
    # The cosine rate over the ramp's steps: 4 + 4 + 2 + 2 steps in all.
    assert int(history.model.optimizer.iterations) == 12
    assert isinstance(
        history.model, keras_sam.GSAMModel if method == "gsam" else keras_sam.SAMModel
    )
    assert any(
        isinstance(layer, keras.Model) and "mobilenet" in layer.name.lower()
        for layer in history.model.inner.layers
    )
    # MobileNetV2's scaling to [-1, 1] is a layer of the model (raw pixels in).
    rescaling = [
        layer for layer in history.model.inner.layers if isinstance(layer, keras.layers.Rescaling)
    ]
    assert len(rescaling) == (backbone == "mobilenet_v2")

    # TensorBoard: SAM's statistics and the batch size, as History logged them.
    scalars = _scalars(os.path.join(out, "logs", "train"))
    for key in ("sharpness", "grad_norm", "rho", "batch_size", "loss"):
        np.testing.assert_allclose(scalars[f"epoch_{key}"], logs[key], rtol=1e-6)
    if method == "gsam":  # rho follows the cosine rate from rho down towards rho / 10
        assert logs["rho"][0] > logs["rho"][-1] >= 0.005
    else:
        assert [float(r) for r in logs["rho"]] == pytest.approx([0.05] * 4)

    # ModelCheckpoint kept the best epoch; the saved model evaluates to it.
    best = max(float(v) for v in logs["val_accuracy"])
    with tfds.testing.mock_data(num_examples=48):
        _, val, _, _ = fine_tune.load_data(fine_tune.parse_args(argv))
    restored = keras.saving.load_model(os.path.join(out, "best.keras"))
    assert type(restored) is type(history.model)
    _, accuracy = restored.evaluate(val, verbose=0)
    # Keras 3.12 returns a tensor here, newer ones a float.
    assert float(accuracy) == pytest.approx(best, abs=1e-6)


def test_fine_tune_refuses_bad_arguments_before_training(capsys):
    for argv, word in (
        (["--epochs", "5", "--stages", "2"], "multiple of --stages"),
        (["--backbone", "vgg"], "--backbone"),
        (["--batch-size", "0"], "--batch-size"),
    ):
        with pytest.raises(SystemExit):
            fine_tune.parse_args(argv)
        assert word in capsys.readouterr().err


def test_text_classifier_trains_a_transformer_with_gsam():
    argv = [
        "--train-examples",
        "32",
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--vocabulary-size",
        "200",
        "--sequence-length",
        "16",
    ]
    with tfds.testing.mock_data(num_examples=40):
        model, history = text_classifier.main(argv)
    assert isinstance(model, keras_sam.GSAMModel)
    kinds = {type(layer).__name__ for layer in model.inner.layers}
    assert {"TokenAndPositionEmbedding", "MultiHeadAttention", "LayerNormalization"} <= kinds
    assert int(model.optimizer.iterations) == 2 * (32 // 8)
    # GSAM's rho follows AdamW's cosine rate: it falls from 0.05 towards 0.005.
    rho = history.history["rho"]
    assert 0.05 >= rho[0] > rho[1] >= 0.005
    # The example's own layer survives a save and load.
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "text_transformer_test.keras")
    model.inner.save(path)
    restored = keras.saving.load_model(
        path,
        custom_objects={"TokenAndPositionEmbedding": text_classifier.TokenAndPositionEmbedding},
    )
    tokens = np.arange(32, dtype="int32").reshape(2, 16) % 200
    np.testing.assert_allclose(
        restored.predict(tokens, verbose=0),
        model.inner.predict(tokens, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )
    os.remove(path)


def test_tune_rho_searches_rho_and_alpha(tmp_path):
    tuner = tune_rho.main(
        [
            "--max-trials",
            "3",
            "--epochs",
            "1",
            "--num-samples",
            "300",
            "--out",
            str(tmp_path),
            "--seed",
            "1",
        ]
    )
    trials = list(tuner.oracle.trials.values())
    assert len(trials) == 3
    for trial in trials:
        values = trial.hyperparameters.values
        assert values["rho"] in tune_rho.RHOS
        assert values["method"] in ("sam", "gsam")
        assert ("alpha" in values) == (values["method"] == "gsam")
    best = tuner.oracle.get_best_trials(1)[0]
    assert best.score == max(t.score for t in trials)
    model = tuner.hypermodel.build(best.hyperparameters)
    assert model.rho == best.hyperparameters.values["rho"]
    if best.hyperparameters.values["method"] == "gsam":
        assert model.alpha == best.hyperparameters.values["alpha"]
