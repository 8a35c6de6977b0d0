"""Constant vs increasing batch (+B) vs cosine learning rate (+C), with GSAM.

The paper's three settings on MNIST-1D (generated offline) with plain SGD:
constant (batch 128, lr 0.1), +B (batch 16 -> 256, doubling in five equal
stages inside ONE fit, lr 0.1) and +C (batch 128, cosine 0.1 -> 0.001).
Prints test accuracy, worst-case sharpness and full gradient norm of each.

    python examples/increasing_batch.py --epochs 20
"""

import argparse

from _quiet import import_tensorflow_quietly  # examples/_quiet.py

import_tensorflow_quietly()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_sam  # noqa: E402
from keras_sam.callbacks import BatchSizeScheduler  # noqa: E402
from keras_sam.callbacks import doubling_schedule  # noqa: E402


def small_cnn(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((40, 1))
    x = inputs
    for filters, strides in ((32, 1), (32, 2), (64, 2)):
        x = keras.layers.Conv1D(filters, 5, strides, padding="same", use_bias=False)(x)
        # momentum 0.9: BN moving statistics settle within a short run
        x = keras.layers.BatchNormalization(momentum=0.9)(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20, help="a multiple of 5")
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.epochs % 5:
        parser.error("--epochs must be a multiple of 5 (five batch-size stages)")

    (x, y), (x_test, y_test) = keras_sam.datasets.mnist1d(args.num_samples)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def dataset_fn(batch_size):
        return (
            tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(len(x), seed=args.seed)
            .batch(batch_size, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE)
        )

    schedule = doubling_schedule(16, stages=5, epochs_per_stage=args.epochs // 5)
    settings = {
        "constant": (128, 0.1, []),
        "+B": (16, 0.1, [BatchSizeScheduler(schedule, dataset_fn)]),
        "+C": (
            128,
            keras_sam.schedules.CosineAnnealing(
                0.1, 0.001, args.epochs, steps_per_epoch=len(x) // 128
            ),
            [],
        ),
    }
    results = {}
    for name, (batch_size, lr, callbacks) in settings.items():
        print(f"--- {name}", flush=True)
        model = keras_sam.GSAMModel(small_cnn(args.seed), rho=0.05, alpha=0.02)
        model.compile(optimizer=keras.optimizers.SGD(lr), loss=loss, metrics=["accuracy"])
        history = model.fit(
            dataset_fn(batch_size),
            epochs=args.epochs,
            callbacks=callbacks,
            shuffle=False,  # dataset_fn shuffles (Keras warns about its default True)
            verbose=2,
        )
        if callbacks:
            sizes = [int(b) for b in history.history["batch_size"]]
            print(f"batch sizes per epoch ({name}): {sizes}")
        acc = model.evaluate(x_test, y_test, batch_size=512, verbose=0, return_dict=True)[
            "accuracy"
        ]
        sharp = keras_sam.sharpness.worst_case_sharpness(model, (x[:1024], y[:1024]), loss)
        grad = keras_sam.sharpness.full_gradient_norm(model, (x, y), loss)
        results[name] = (acc, sharp, grad)

    print(f"\nGSAM, plain SGD, {args.epochs} epochs, {len(x)} training examples")
    print(f"{'setting':>9} {'test acc':>9} {'sharpness':>10} {'grad norm':>10}")
    for name, (acc, sharp, grad) in results.items():
        print(f"{name:>9} {acc:9.4f} {sharp:10.4f} {grad:10.4f}")


if __name__ == "__main__":
    main()
