"""A sharpness-aware method keras_sam does not ship, written on its contract.

`LayerwiseSAM` perturbs each layer by its own radius, normalized by that
layer's own gradient norm: `e_v = rho_L * g_v / ||g_L||` for every variable
`v` of layer `L` (plain SAM normalizes by one global norm). It is the worked
example of the guide "Write your own SAM variant" (docs/custom-method.md),
which shows the class below as it is here; tests/integration/test_custom_method.py checks
its steps against a NumPy replay on TensorFlow, JAX and PyTorch.

    python examples/layerwise_sam.py --epochs 5
"""

import argparse

from _quiet import import_tensorflow_quietly  # examples/_quiet.py

import_tensorflow_quietly()

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import keras_sam  # noqa: E402


# --8<-- [start:method]
@keras.saving.register_keras_serializable(package="my_methods")
class LayerwiseSAM(keras_sam.models.TwoGradientModel):
    """SAM with a radius per layer: `e_v = rho_L * g_v / ||g_L||`.

    Args:
        model: the `keras.Model` to train, built.
        rho: the radius of every layer not in `layer_rho`.
        layer_rho: `{layer name: radius}` for the layers with their own.
        **kwargs: the keywords of `TwoGradientModel` (`sam_every`, ...).
    """

    def __init__(self, model, rho=0.05, layer_rho=None, **kwargs):
        self.rho = rho
        self.layer_rho = dict(layer_rho or {})
        super().__init__(model, **kwargs)

    def perturbation(self, gradients, variables, rho):
        layers = [v.path.split("/")[-2] for v in self.trainable_variables]
        squares = {}
        for layer, g in zip(layers, gradients):
            squares[layer] = squares.get(layer, 0.0) + ops.sum(g * g)
        offsets = []
        for layer, g in zip(layers, gradients):
            norm = ops.sqrt(squares[layer]) + 1e-12
            offsets.append(self.layer_rho.get(layer, rho) * g / norm)
        return offsets

    def get_config(self):
        config = super().get_config()
        config.update(rho=self.rho, layer_rho=self.layer_rho)
        return config


# --8<-- [end:method]


def main():
    parser = argparse.ArgumentParser(description="Train a small regression with LayerwiseSAM.")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of training (default 5)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")
    inner = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="body"),
            keras.layers.Dense(1, name="head"),
        ]
    )
    model = LayerwiseSAM(inner, rho=0.05, layer_rho={"head": 0.01})
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    history = model.fit(x, y, batch_size=32, epochs=args.epochs, verbose=0)
    for epoch, (loss, sharpness) in enumerate(
        zip(history.history["loss"], history.history["sharpness"])
    ):
        print(f"epoch {epoch}: loss {loss:.4f}, sharpness {sharpness:.5f}")


if __name__ == "__main__":
    main()
