"""Train one small model three ways on MNIST-1D: SGD, SAM and GSAM.

MNIST-1D is generated on the spot (no download). Runs in a few minutes on a
laptop CPU:

    python examples/quickstart.py --epochs 20
"""

import argparse

from _quiet import import_tensorflow_quietly  # examples/_quiet.py

import_tensorflow_quietly()

import keras

import keras_sam


def small_cnn(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((40, 1)),
            keras.layers.Conv1D(32, 5, padding="same", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv1D(32, 5, strides=2, padding="same"),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    (x, y), (x_test, y_test) = keras_sam.datasets.mnist1d()
    steps = len(x) // args.batch_size
    results = {}
    for name in ("sgd", "sam", "gsam"):
        inner = small_cnn(args.seed)
        if name == "sgd":
            model = inner
        elif name == "sam":
            model = keras_sam.SAMModel(inner, rho=0.05)
        else:
            model = keras_sam.GSAMModel(inner, rho=0.05, alpha=0.02, rho_min=0.005)
        lr = keras_sam.schedules.CosineAnnealing(
            0.1, 0.001, epochs=args.epochs, steps_per_epoch=steps
        )
        model.compile(
            optimizer=keras.optimizers.SGD(lr, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        print(f"--- {name}")
        history = model.fit(
            x,
            y,
            batch_size=args.batch_size,
            epochs=args.epochs,
            verbose=2,
            validation_data=(x_test, y_test),
        )
        results[name] = history.history["val_accuracy"][-1]
    print("\ntest accuracy after", args.epochs, "epochs:")
    for name, acc in results.items():
        print(f"  {name:>5}: {acc:.4f}")


if __name__ == "__main__":
    main()
