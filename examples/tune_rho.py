"""Search SAM's rho (and GSAM's alpha) with KerasTuner on MNIST-1D.

Each trial builds a fresh network, wraps it in `SAMModel` or `GSAMModel` with
the trial's `rho` (and `alpha` for GSAM) and trains it with a cosine learning
rate; KerasTuner keeps the setting with the best validation accuracy.
MNIST-1D is generated on the spot (no download).

    pip install ".[examples]"        # from the repository root
    python examples/tune_rho.py --max-trials 12 --epochs 20
"""

import argparse

from _quiet import import_tensorflow_quietly  # examples/_quiet.py

import_tensorflow_quietly()

import keras
import keras_tuner

import keras_sam

RHOS = (0.01, 0.02, 0.05, 0.1, 0.2)
ALPHAS = (0.0, 0.01, 0.02, 0.05)


def small_cnn():
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


class SAMHyperModel(keras_tuner.HyperModel):
    """A SAM or GSAM model with the trial's rho (and alpha)."""

    def __init__(self, methods, epochs, steps_per_epoch):
        super().__init__()
        self.methods, self.epochs, self.steps_per_epoch = methods, epochs, steps_per_epoch

    def build(self, hp):
        method = hp.Choice("method", list(self.methods))
        rho = hp.Choice("rho", list(RHOS))
        if method == "gsam":
            with hp.conditional_scope("method", ["gsam"]):
                alpha = hp.Choice("alpha", list(ALPHAS))
            model = keras_sam.GSAMModel(small_cnn(), rho=rho, alpha=alpha, rho_min=rho / 10)
        else:
            model = keras_sam.SAMModel(small_cnn(), rho=rho)
        lr = keras_sam.schedules.CosineAnnealing(
            0.1, 0.001, epochs=self.epochs, steps_per_epoch=self.steps_per_epoch
        )
        model.compile(
            optimizer=keras.optimizers.SGD(lr, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return model


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="sam,gsam", help="sam, gsam or both (default both)")
    p.add_argument("--max-trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="tune_rho_out", help="KerasTuner's folder")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in ("sam", "gsam")]
    if bad or not args.methods:
        parser.error(f"--methods: unknown {bad or '(empty)'}; choose sam, gsam or sam,gsam")
    for name in ("max_trials", "epochs", "batch_size", "num_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int")
    return args


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    (x, y), (x_test, y_test) = keras_sam.datasets.mnist1d(args.num_samples)
    # Trials are compared on a validation split of the training set; the test
    # set is used once, for the best model.
    held_out = len(x) // 5
    (x, y), validation = (x[held_out:], y[held_out:]), (x[:held_out], y[:held_out])
    steps = keras_sam.schedules.steps_per_epoch(
        len(x), args.batch_size, args.epochs, drop_remainder=False
    )
    tuner = keras_tuner.RandomSearch(
        SAMHyperModel(args.methods, args.epochs, steps),
        objective="val_accuracy",
        max_trials=args.max_trials,
        seed=args.seed,
        directory=args.out,
        project_name="tune_rho",
        overwrite=True,
    )
    tuner.search(
        x, y, batch_size=args.batch_size, epochs=args.epochs, validation_data=validation, verbose=0
    )
    tuner.results_summary(num_trials=min(5, args.max_trials))
    best = tuner.get_best_hyperparameters()[0].values
    model = tuner.get_best_models()[0]
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"best: {best}; its test accuracy {accuracy:.4f}")
    return tuner


if __name__ == "__main__":
    main()
