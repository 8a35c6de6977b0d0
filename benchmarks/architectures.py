"""Networks of the paper's experiments, in plain Keras (any backend).

- `resnet18`: ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), as in the
  authors' code (kuangliu's pytorch-cifar layout).
- `wide_resnet`: WideResNet-d-k (Zagoruyko & Komodakis), WRN-28-10 by default.
- `mnist1d_cnn`: a small 1-D conv net with BatchNorm for the CPU-sized
  MNIST-1D benchmark.
- `mnist1d_mlp`: a two-hidden-layer MLP without normalization, the second
  MNIST-1D architecture (the findings may depend on BatchNorm).
- `small_convnet`: three conv blocks, for the CPU step-cost benchmarks.
- `tiny_cnn2d`: one conv block (8 filters), only to exercise the CIFAR path of
  `benchmarks.paper` in tests; smaller than `small_convnet` on purpose.
"""

import keras

layers = keras.layers


def _conv(filters, kernel, strides=1):
    return layers.Conv2D(
        filters,
        kernel,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
    )


def _basic_block(x, filters, strides):
    shortcut = x
    h = layers.ReLU()(layers.BatchNormalization()(_conv(filters, 3, strides)(x)))
    h = layers.BatchNormalization()(_conv(filters, 3)(h))
    if strides != 1 or x.shape[-1] != filters:
        shortcut = layers.BatchNormalization()(_conv(filters, 1, strides)(x))
    return layers.ReLU()(layers.Add()([h, shortcut]))


def resnet18(input_shape=(32, 32, 3), classes=10):
    """ResNet-18 with the CIFAR stem; returns logits."""
    inputs = keras.Input(input_shape)
    x = layers.ReLU()(layers.BatchNormalization()(_conv(64, 3)(inputs)))
    for filters, strides in ((64, 1), (128, 2), (256, 2), (512, 2)):
        x = _basic_block(x, filters, strides)
        x = _basic_block(x, filters, 1)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(classes)(x), name="resnet18")


def _wide_block(x, filters, strides):
    h = layers.ReLU()(layers.BatchNormalization()(x))
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv(filters, 1, strides)(h)
    h = _conv(filters, 3, strides)(h)
    h = layers.ReLU()(layers.BatchNormalization()(h))
    h = _conv(filters, 3)(h)
    return layers.Add()([h, shortcut])


def wide_resnet(depth=28, width=10, input_shape=(32, 32, 3), classes=10):
    """WideResNet-depth-width (pre-activation); returns logits."""
    if (depth - 4) % 6:
        raise ValueError(f"`depth` must be 6n + 4 (e.g. 16, 22, 28), got {depth}.")
    n = (depth - 4) // 6
    inputs = keras.Input(input_shape)
    x = _conv(16, 3)(inputs)
    for i, filters in enumerate((16 * width, 32 * width, 64 * width)):
        for j in range(n):
            x = _wide_block(x, filters, 2 if (j == 0 and i > 0) else 1)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(classes)(x), name=f"wrn{depth}_{width}")


def mnist1d_cnn(input_shape=(40, 1), classes=10):
    """A small conv net for MNIST-1D (about 20k parameters); returns logits.

    BatchNorm momentum is 0.9, not Keras' 0.99: at 25 steps per epoch (3,200
    examples, batch 128) the 0.99 moving statistics lag the weights for
    several epochs and inflate the test error of the large-batch runs."""
    inputs = keras.Input(input_shape)
    x = inputs
    for filters, strides in ((32, 1), (32, 2), (64, 2)):
        x = layers.Conv1D(filters, 5, strides=strides, padding="same", use_bias=False)(x)
        x = layers.ReLU()(layers.BatchNormalization(momentum=0.9)(x))
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, layers.Dense(classes)(x), name="mnist1d_cnn")


def mnist1d_mlp(input_shape=(40, 1), classes=10, width=256):
    """Two ReLU hidden layers of `width` units, no normalization; returns logits."""
    inputs = keras.Input(input_shape)
    x = layers.Flatten()(inputs)
    for _ in range(2):
        x = layers.Dense(width, activation="relu")(x)
    return keras.Model(inputs, layers.Dense(classes)(x), name="mnist1d_mlp")


def small_convnet(image=32, classes=10):
    """Three conv + BatchNorm blocks, for the CPU step-cost benchmarks."""
    inputs = keras.Input((image, image, 3))
    h = inputs
    for filters, stride in ((32, 1), (64, 2), (128, 2)):
        h = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(h)
        h = layers.ReLU()(layers.BatchNormalization()(h))
    h = layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, layers.Dense(classes)(h))


def tiny_cnn2d(input_shape=(32, 32, 3), classes=10):
    """A very small 2-D conv net, only to exercise the CIFAR path in tests."""
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(classes)(x), name="tiny_cnn2d")


ARCHITECTURES = {
    "resnet18": resnet18,
    "wrn28_10": wide_resnet,
    "mnist1d_cnn": mnist1d_cnn,
    "mnist1d_mlp": mnist1d_mlp,
}
