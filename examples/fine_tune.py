"""Fine-tune a keras.applications backbone with SAM or GSAM.

A new classification head on a `keras.applications` backbone, trained with
SAM (or GSAM) through plain `model.fit`: a cosine learning rate, the batch
size doubling at scheduled epochs (the paper's "+B"), `ModelCheckpoint` for
the best weights and `TensorBoard` logging SAM's sharpness, rho, the gradient
norm and the batch size next to the loss.

The data comes from TensorFlow Datasets (`--dataset`, any image
classification set with `image` and `label` features; it downloads on first
use). The backbone starts from random weights unless you pass
`--weights imagenet` (Keras downloads the file, or reads it from its cache).

    pip install ".[examples]"        # from the repository root
    python examples/fine_tune.py --dataset tf_flowers --weights imagenet --epochs 12
    tensorboard --logdir fine_tune_out/logs
"""

import argparse
import os

from _quiet import import_tensorflow_quietly  # examples/_quiet.py

import_tensorflow_quietly()

import keras
import tensorflow as tf

import keras_sam

BACKBONES = {
    # name: (constructor, the scaling its weights expect as a layer, or None
    # when the backbone scales its input itself)
    "mobilenet_v3_small": ("MobileNetV3Small", None),
    "efficientnet_b0": ("EfficientNetB0", None),
    "mobilenet_v2": ("MobileNetV2", (1 / 127.5, -1.0)),
    "resnet50_v2": ("ResNet50V2", (1 / 127.5, -1.0)),
}
"""Each takes raw 0-255 RGB pixels: the preprocessing is part of the model,
so the saved checkpoint serves raw images and the data pipeline uses
TensorFlow ops only (it works under every Keras backend)."""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="tf_flowers", help="a TFDS image classification set")
    p.add_argument(
        "--train-examples",
        type=int,
        default=None,
        help="use only the first N training examples (default all)",
    )
    p.add_argument("--backbone", choices=sorted(BACKBONES), default="mobilenet_v3_small")
    p.add_argument(
        "--weights",
        choices=("none", "imagenet"),
        default="none",
        help="backbone weights (default none: random initialization)",
    )
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--method", choices=("sam", "gsam"), default="sam")
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--alpha", type=float, default=0.02, help="GSAM's alpha")
    p.add_argument("--learning-rate", type=float, default=0.01)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32, help="the first stage's batch size")
    p.add_argument(
        "--stages",
        type=int,
        default=3,
        help="the batch size doubles at the start of each stage (default 3)",
    )
    p.add_argument(
        "--out",
        default="fine_tune_out",
        help="checkpoint and TensorBoard logs (default fine_tune_out)",
    )
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("image_size", "epochs", "batch_size", "stages"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int")
    if args.epochs % args.stages:
        parser.error(f"--epochs ({args.epochs}) must be a multiple of --stages ({args.stages})")
    if args.train_examples is not None and args.train_examples < 1:
        parser.error("--train-examples must be a positive int")
    return args


def load_data(args):
    """Train (unbatched) and validation datasets of (resized image, label),
    the number of training examples and of classes."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(args.dataset)
    builder.download_and_prepare()  # first: the split information is then local
    splits = builder.info.splits
    train_split = "train"
    val_split = next((s for s in ("validation", "test") if s in splits), None)
    if val_split is None:  # e.g. tf_flowers has only "train": hold out 10%
        train_split, val_split = "train[:90%]", "train[90%:]"
    classes = builder.info.features["label"].num_classes
    size = (args.image_size, args.image_size)

    def prepare(example):
        image = example["image"]
        if image.shape[-1] == 1:  # grayscale sets (MNIST and the like)
            image = tf.image.grayscale_to_rgb(image)
        return tf.image.resize(tf.cast(image, "float32"), size), example["label"]

    train = builder.as_dataset(split=train_split)
    if args.train_examples is not None:
        train = train.take(args.train_examples)
    train = train.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    num_train = int(train.reduce(0, lambda n, _: n + 1))
    val = builder.as_dataset(split=val_split).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return train, val.batch(64).cache(), num_train, classes


def build_model(args, classes):
    name, scaling = BACKBONES[args.backbone]
    constructor = getattr(keras.applications, name)
    backbone = constructor(
        include_top=False,
        weights=None if args.weights == "none" else args.weights,
        input_shape=(args.image_size, args.image_size, 3),
        pooling="avg",
    )
    inputs = keras.Input((args.image_size, args.image_size, 3))
    x = inputs if scaling is None else keras.layers.Rescaling(*scaling)(inputs)
    x = backbone(x)
    x = keras.layers.Dropout(0.2)(x)
    return keras.Model(inputs, keras.layers.Dense(classes)(x), name="fine_tuned")


def main(argv=None):
    args = parse_args(argv)
    train, val, num_train, classes = load_data(args)
    if num_train < args.batch_size * 2 ** (args.stages - 1):
        raise SystemExit(
            f"error: {num_train} training examples give no full batch of the last stage "
            f"({args.batch_size * 2 ** (args.stages - 1)}); lower --batch-size or --stages"
        )

    def dataset_fn(batch_size):
        return (
            # A bounded buffer: the decoded images of a large set fill memory.
            train.shuffle(min(num_train, 2048), seed=0)
            .batch(batch_size, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE)
        )

    # The batch ramp: batch_size, 2 * batch_size, ... one stage each.
    schedule = keras_sam.callbacks.doubling_schedule(
        args.batch_size, stages=args.stages, epochs_per_stage=args.epochs // args.stages
    )
    ramp = keras_sam.callbacks.BatchSizeScheduler(schedule, dataset_fn)
    lr = keras_sam.schedules.CosineAnnealing(
        args.learning_rate,
        args.learning_rate / 100,
        epochs=args.epochs,
        steps_per_epoch=ramp.steps_per_epoch(args.epochs),
    )

    inner = build_model(args, classes)
    if args.method == "sam":
        model = keras_sam.SAMModel(inner, rho=args.rho)
    else:  # GSAM's rho follows the learning rate from rho down to rho / 10
        model = keras_sam.GSAMModel(inner, rho=args.rho, alpha=args.alpha, rho_min=args.rho / 10)
    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    os.makedirs(args.out, exist_ok=True)
    checkpoint = os.path.join(args.out, "best.keras")
    history = model.fit(
        dataset_fn(args.batch_size),
        epochs=args.epochs,
        validation_data=val,
        callbacks=[
            ramp,  # first: it puts the batch size into the logs the others read
            keras.callbacks.ModelCheckpoint(
                checkpoint, monitor="val_accuracy", save_best_only=True
            ),
            keras.callbacks.TensorBoard(os.path.join(args.out, "logs")),
        ],
        verbose=2,
    )
    best = max(history.history["val_accuracy"])
    print(f"batch sizes per epoch: {history.history['batch_size']}")
    print(f"best validation accuracy {best:.4f}; checkpoint {checkpoint}")
    return history


if __name__ == "__main__":
    main()
