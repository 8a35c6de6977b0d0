"""Data sets of the grid: arrays, tf.data pipelines, and the memory estimate."""

import os

import keras
import numpy as np

import keras_sam
from benchmarks.paper.protocol import CIFAR_SIZES
from benchmarks.paper.protocol import DATASETS
from benchmarks.paper.protocol import GROWN
from benchmarks.paper.protocol import INCREASING
from benchmarks.paper.protocol import MODELS
from benchmarks.paper.protocol import STAGES

_DATA_CACHE = {}


def load_mnist1d(num_samples, seed):
    key = ("mnist1d", num_samples, seed)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = keras_sam.datasets.mnist1d(num_samples, seed)
    return _DATA_CACHE[key]


def load_cifar(name, num_samples=None):
    """uint8 arrays `(x, y), (x_test, y_test)` from tensorflow_datasets."""
    key = (name, num_samples)
    if key not in _DATA_CACHE:
        import tensorflow_datasets as tfds

        def arrays(ds):
            # Chunks rather than batch_size=-1 (which aborts on generator-backed
            # data such as tfds.testing.mock_data).
            xs, ys = [], []
            for xb, yb in tfds.as_numpy(ds.batch(10000)):
                xs.append(xb)
                ys.append(yb)
            return np.concatenate(xs), np.concatenate(ys)

        train, test = tfds.load(
            name, split=["train", "test"], as_supervised=True, shuffle_files=False
        )
        (x, y), (xt, yt) = arrays(train), arrays(test)
        if num_samples is not None:
            x, y = x[:num_samples], y[:num_samples]
        _DATA_CACHE[key] = (
            (np.asarray(x, np.uint8), np.asarray(y, np.int32)),
            (np.asarray(xt, np.uint8), np.asarray(yt, np.int32)),
        )
    return _DATA_CACHE[key]


def channel_stats(x):
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    x = x.astype(np.float64) / 255.0
    axes = tuple(range(x.ndim - 1))
    return x.mean(axis=axes).astype(np.float32), np.maximum(x.std(axis=axes), 1e-6).astype(
        np.float32
    )


class Data:
    """Arrays plus the tf.data pipelines of one data set."""

    def __init__(self, dataset, num_samples, data_seed):
        self.dataset = dataset
        if dataset == "mnist1d":
            (self.x, self.y), (self.x_test, self.y_test) = load_mnist1d(num_samples, data_seed)
            self.image = False
            self.mean = self.std = None
        else:
            (self.x, self.y), (self.x_test, self.y_test) = load_cifar(dataset, num_samples)
            self.image = True
            self.mean, self.std = channel_stats(self.x)
        self.classes = DATASETS[dataset][1]
        self.input_shape = tuple(self.x.shape[1:])

    @property
    def num_train(self):
        return int(self.x.shape[0])

    def _normalize(self, x):
        import tensorflow as tf

        if not self.image:
            return x
        x = tf.cast(x, tf.float32) / 255.0
        return (x - self.mean) / self.std

    def augment(self, image):
        """Random crop 32 from the 4-pixel zero-padded image, horizontal flip."""
        import tensorflow as tf

        h, w, c = image.shape
        image = tf.image.pad_to_bounding_box(image, 4, 4, h + 8, w + 8)
        image = tf.image.random_crop(image, (h, w, c))
        return tf.image.random_flip_left_right(image)

    def train_dataset(self, batch_size, seed, augment=True):
        """Shuffled (reshuffled each epoch), augmented, normalized, batched
        with drop_remainder=True."""
        import tensorflow as tf

        ds = tf.data.Dataset.from_tensor_slices((self.x, self.y))
        ds = ds.shuffle(self.num_train, seed=seed, reshuffle_each_iteration=True)
        if self.image:
            if augment:
                ds = ds.map(lambda x, y: (self.augment(x), y), num_parallel_calls=tf.data.AUTOTUNE)
            ds = ds.map(lambda x, y: (self._normalize(x), y), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def eval_arrays(self, x):
        """Normalized float32 arrays (no augmentation) for evaluation."""
        if not self.image:
            return x
        return ((x.astype(np.float32) / 255.0 - self.mean) / self.std).astype(np.float32)

    def test_dataset(self, batch_size=500):
        import tensorflow as tf

        ds = tf.data.Dataset.from_tensor_slices((self.x_test, self.y_test))
        if self.image:
            ds = ds.map(lambda x, y: (self._normalize(x), y))
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def cached_data(dataset, num_samples, data_seed):
    """`Data(...)`, built once per process (a worker trains many runs)."""
    key = ("Data", dataset, num_samples, data_seed)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = Data(dataset, num_samples, data_seed)
    return _DATA_CACHE[key]


# ---------------------------------------------------------------------------
# Memory check.


def available_memory_bytes():
    """MemAvailable from /proc/meminfo, else physical pages x page size."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_memory_bytes(args):
    """Rough peak host memory of the grid: `--jobs` runs side by side (each
    worker process with its own data and one model alive), the largest of
    `args.models` in each.

    data: arrays in memory (uint8 images / float32 signals), counted twice
    (numpy + tf.data copy); model: parameters x 4 bytes x 6 (weights, two
    gradients, the SAM copy, slack); activations (CPU only): output sizes of
    all layers x the largest batch x 4 bytes x 3 (forward, backward, second
    SAM pass).
    """
    if args.dataset == "mnist1d":
        n = args.num_samples
        data_bytes = n * (40 * 4 + 4)
        input_shape, classes = (40, 1), 10
    else:
        train, test = CIFAR_SIZES[args.dataset]
        if args.num_samples is not None:
            train = min(train, args.num_samples)
        data_bytes = (train + test) * (32 * 32 * 3 + 4)
        input_shape, classes = (32, 32, 3), DATASETS[args.dataset][1]
    params = activations = 0
    for name in getattr(args, "models", [args.model]):
        model = MODELS[name](input_shape=input_shape, classes=classes)
        params = max(params, model.count_params())
        outputs = 0
        for layer in model.layers:
            shape = getattr(getattr(layer, "output", None), "shape", None)
            if shape is not None:
                outputs += int(np.prod([d for d in shape[1:] if d is not None]))
        activations = max(activations, outputs)
        del model
        keras.backend.clear_session()
    max_batch = args.batch
    if any(s in INCREASING + GROWN for s in args.schedules):
        max_batch = max(max_batch, args.initial_batch * 2 ** (STAGES - 1))
    import tensorflow as tf

    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    total = 2 * data_bytes + 6 * 4 * params
    if not on_gpu:
        total += 3 * 4 * max_batch * activations
    jobs = max(getattr(args, "jobs", 1), 1)
    total *= jobs
    return int(total), dict(
        data_bytes=data_bytes,
        params=params,
        jobs=jobs,
        activations_per_example=activations,
        max_batch=max_batch,
        on_gpu=on_gpu,
    )


def check_memory(args):
    need, parts = estimate_memory_bytes(args)
    have = available_memory_bytes()
    if have is not None and need > have:
        raise SystemExit(
            f"error: the grid does not fit in memory: about {need / 2**30:.2f} GiB "
            f"estimated ({parts['jobs']} job(s), each with data "
            f"{parts['data_bytes'] / 2**30:.2f} GiB and a model of "
            f"{parts['params']:,} parameters, largest batch "
            f"{parts['max_batch']}) but only {have / 2**30:.2f} GiB available "
            "(MemAvailable). Lower --jobs, --num-samples, --batch / "
            "--initial-batch, or pick a smaller --model (choices: "
            + ", ".join(sorted(MODELS))
            + ")."
        )
    return need, have
