"""A small Transformer text classifier trained with GSAM.

Token and position embeddings, one Transformer encoder block
(`MultiHeadAttention`, a feed-forward layer, residuals and `LayerNormalization`)
and a dense head, trained with GSAM (the surrogate gap guided SAM) and a
cosine learning rate through plain `model.fit`. Text comes from TensorFlow
Datasets (`--dataset`, any set with `text` and `label` features; IMDB reviews
by default, downloaded on first use) and is tokenized by
`keras.layers.TextVectorization`.

    pip install ".[examples]"        # from the repository root
    python examples/text_classifier.py --epochs 3
"""

import argparse

from _quiet import import_tensorflow_quietly  # examples/_quiet.py

import_tensorflow_quietly()

import keras

import keras_sam


class TokenAndPositionEmbedding(keras.layers.Layer):
    """Token embedding plus a learned embedding of the position."""

    def __init__(self, sequence_length, vocabulary_size, dim, **kwargs):
        super().__init__(**kwargs)
        self.sequence_length, self.vocabulary_size, self.dim = (
            sequence_length,
            vocabulary_size,
            dim,
        )
        self.tokens = keras.layers.Embedding(vocabulary_size, dim)
        self.positions = keras.layers.Embedding(sequence_length, dim)

    def build(self, input_shape):
        self.tokens.build(input_shape)
        self.positions.build((input_shape[-1],))

    def call(self, x):
        positions = keras.ops.arange(keras.ops.shape(x)[-1])
        return self.tokens(x) + self.positions(positions)

    def get_config(self):
        return {
            **super().get_config(),
            "sequence_length": self.sequence_length,
            "vocabulary_size": self.vocabulary_size,
            "dim": self.dim,
        }


def transformer_classifier(sequence_length, vocabulary_size, classes, dim=64, heads=2):
    """Embeddings, one encoder block, average pooling, a dense head (logits)."""
    tokens = keras.Input((sequence_length,), dtype="int32")
    x = TokenAndPositionEmbedding(sequence_length, vocabulary_size, dim)(tokens)
    attention = keras.layers.MultiHeadAttention(heads, dim // heads, dropout=0.1)(x, x)
    x = keras.layers.LayerNormalization()(x + attention)
    feed_forward = keras.layers.Dense(dim * 2, activation="gelu")(x)
    x = keras.layers.LayerNormalization()(x + keras.layers.Dense(dim)(feed_forward))
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dropout(0.1)(x)
    return keras.Model(tokens, keras.layers.Dense(classes)(x), name="text_transformer")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dataset",
        default="imdb_reviews",
        help="a TFDS text classification set (default imdb_reviews)",
    )
    p.add_argument(
        "--train-examples",
        type=int,
        default=None,
        help="use only the first N training examples (default all)",
    )
    p.add_argument("--vocabulary-size", type=int, default=20000)
    p.add_argument("--sequence-length", type=int, default=200)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--alpha", type=float, default=0.02, help="GSAM's alpha")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("vocabulary_size", "sequence_length", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int")
    if args.train_examples is not None and args.train_examples < args.batch_size:
        parser.error("--train-examples must be at least --batch-size")
    return args


def main(argv=None):
    args = parse_args(argv)
    import tensorflow_datasets as tfds

    builder = tfds.builder(args.dataset)
    builder.download_and_prepare()
    classes = builder.info.features["label"].num_classes
    train = builder.as_dataset(split="train", as_supervised=True)
    if args.train_examples is not None:
        train = train.take(args.train_examples)
    test = builder.as_dataset(split="test", as_supervised=True)

    vectorize = keras.layers.TextVectorization(
        args.vocabulary_size, output_sequence_length=args.sequence_length
    )
    vectorize.adapt(train.map(lambda text, label: text).batch(256))
    train = train.map(lambda text, label: (vectorize(text), label)).cache()
    num_train = int(train.reduce(0, lambda n, _: n + 1))
    test = test.map(lambda text, label: (vectorize(text), label)).batch(256)
    train = train.shuffle(num_train, seed=0).batch(args.batch_size, drop_remainder=True)

    inner = transformer_classifier(args.sequence_length, vectorize.vocabulary_size(), classes)
    # GSAM's rho follows the learning rate from rho down to rho / 10.
    model = keras_sam.GSAMModel(inner, rho=args.rho, alpha=args.alpha, rho_min=args.rho / 10)
    lr = keras_sam.schedules.CosineAnnealing(
        args.learning_rate,
        args.learning_rate / 100,
        epochs=args.epochs,
        steps_per_epoch=num_train // args.batch_size,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(lr, weight_decay=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(train, epochs=args.epochs, validation_data=test, verbose=2)
    print(f"test accuracy after {args.epochs} epochs: {history.history['val_accuracy'][-1]:.4f}")
    return model, history


if __name__ == "__main__":
    main()
