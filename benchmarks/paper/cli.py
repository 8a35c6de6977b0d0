"""Rerun the comparison of Harada & Iiduka (arXiv 2409.09984) with one command.

Grid: {sgd, sam, gsam} x {constant, B, C, BC, linear} x seeds, with the
paper's protocol: plain SGD (no momentum, no weight decay), lr 0.1, rho 0.05,
alpha 0.02 (GSAM's rho constant), cross-entropy, last partial batch dropped.

- constant: batch `--batch` (128), lr 0.1;
- B: batch doubles over five equal stages from `--initial-batch` (16 -> 256),
  lr 0.1 constant;
- C: batch 128, cosine per step 0.1 -> 0.001;
- linear: batch 128, linear per step 0.1 -> 0.001;
- BC: increasing batch and cosine (per-epoch step counts from the scheduler).

After each run: worst-case sharpness (L-inf Auto-PGD, rho 2e-4, 20
iterations, first `--sharpness-examples` training examples in batches of 128,
inference mode) and the full-gradient norm on the whole (un-augmented)
training set.

    python benchmarks/paper.py                      # MNIST-1D, CPU-sized
    python benchmarks/paper.py --dataset cifar10 --model resnet18 --epochs 200 \\
        --seeds 0,1,2                               # the paper's setting (GPU)

The CPU default (MNIST-1D, 4000 examples = 3200 train / 800 test, 20 epochs
= 5 stages of 4 epochs, 3 seeds, 45 runs) finishes in well under an hour on a
2-core CPU; `results.md` records the wall time. Caveat of this scale: with
3200 examples the batch-128 schedules (constant, C, linear) get 25 steps per
epoch, about a third of what B / BC get (batch 16 first), so they are less
converged; use `--epochs 40` or more (the paper: 200) to compare converged
models. Outputs go to `--out` (default benchmarks/results/<dataset>):
`results.md`, `runs.json`, PNG plots and `runs/<method>_<schedule>_seed<k>.json`
(one per finished run; rerunning the same command skips them).
"""

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, _HERE)

import keras  # noqa: E402

import keras_sam  # noqa: E402
from architectures import ARCHITECTURES  # noqa: E402

METHODS = ("sgd", "sam", "gsam")
SCHEDULES = ("constant", "B", "C", "BC", "linear")
INCREASING = ("B", "BC")
STAGES = 5

DATASETS = {
    # name: (default model, classes, default epochs, CPU-sized?)
    "mnist1d": ("mnist1d_cnn", 10),
    "cifar10": ("resnet18", 10),
    "cifar100": ("resnet18", 100),
}
CIFAR_SIZES = {"cifar10": (50000, 10000), "cifar100": (50000, 10000)}


def tiny_cnn2d(input_shape=(32, 32, 3), classes=10):
    """A very small 2-D conv net, only to exercise the CIFAR path in tests."""
    layers = keras.layers
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(classes)(x), name="tiny_cnn2d")


MODELS = dict(ARCHITECTURES)
MODELS["tiny_cnn2d"] = tiny_cnn2d

# Protocol constants (the paper's).
LR = 0.1
LR_FINAL = 0.001
RHO = 0.05
ALPHA = 0.02
SHARPNESS_RHO = 2e-4
SHARPNESS_BATCH = 128

# Test hook: called as EPOCH_HOOK(run_name, epoch) at the end of every epoch.
EPOCH_HOOK = None

TINY = {
    "num_samples": 500,
    "epochs": 5,
    "seeds": "0",
    "methods": "sgd,sam",
    "schedules": "B,BC",
    "sharpness_examples": 128,
    "sharpness_iterations": 5,
}


# ---------------------------------------------------------------------------
# Command line.


def _csv_choice(name, allowed):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"unknown {name} {', '.join(map(repr, bad)) or '(empty)'}; "
                f"choose from: {', '.join(allowed)} (comma separated)"
            )
        return list(dict.fromkeys(items))

    return parse


def _seeds(text):
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds must be comma-separated ints, e.g. 0,1,2; got {text!r}"
        ) from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"--seeds must be ints >= 0; got {text!r}")
    return list(dict.fromkeys(seeds))


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def build_parser():
    p = argparse.ArgumentParser(
        description="Rerun the SGD/SAM/GSAM x batch/lr-schedule comparison of "
        "Harada & Iiduka (2024).",
    )
    p.add_argument("--dataset", default="mnist1d", choices=sorted(DATASETS))
    p.add_argument("--model", default=None, choices=sorted(MODELS),
                   help="default: mnist1d_cnn for mnist1d, resnet18 for CIFAR")
    p.add_argument("--methods", type=_csv_choice("method", METHODS),
                   default=None, help=f"comma separated, from {','.join(METHODS)}")
    p.add_argument("--schedules", type=_csv_choice("schedule", SCHEDULES),
                   default=None, help=f"comma separated, from {','.join(SCHEDULES)}")
    p.add_argument("--seeds", type=_seeds, default=None, help="default 0,1,2")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="total epochs (a multiple of 5 with B/BC); default 20 "
                   "(the paper: 200)")
    p.add_argument("--batch", type=_positive_int, default=128,
                   help="constant batch size (default 128)")
    p.add_argument("--initial-batch", type=_positive_int, default=16,
                   help="first batch size of B/BC, doubled 4 times (default 16)")
    p.add_argument("--num-samples", type=_positive_int, default=None,
                   help="mnist1d: examples in total (80%% train), default 4000; "
                   "cifar: training examples used (default all)")
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the MNIST-1D generation (default 0)")
    p.add_argument("--sharpness-examples", type=_positive_int, default=None,
                   help="first N training examples for the worst-case "
                   "sharpness (default 1024, as the paper)")
    p.add_argument("--sharpness-iterations", type=_positive_int, default=None,
                   help="Auto-PGD iterations (default 20)")
    p.add_argument("--sharpness-every", type=int, default=0,
                   help="also measure sharpness/gradient norm every k epochs "
                   "(0: at the end only, default)")
    p.add_argument("--out", default=None,
                   help="output folder (default benchmarks/results/<dataset>)")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny grid for tests: " + ", ".join(
                       f"{k}={v}" for k, v in TINY.items()))
    return p


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            if getattr(args, key) is None:
                if key == "seeds":
                    value = _seeds(value)
                elif key == "methods":
                    value = _csv_choice("method", METHODS)(value)
                elif key == "schedules":
                    value = _csv_choice("schedule", SCHEDULES)(value)
                setattr(args, key, value)
    if args.methods is None:
        args.methods = list(METHODS)
    if args.schedules is None:
        args.schedules = list(SCHEDULES)
    if args.seeds is None:
        args.seeds = [0, 1, 2]
    if args.epochs is None:
        args.epochs = 20
    if args.num_samples is None and args.dataset == "mnist1d":
        args.num_samples = 4000
    if args.sharpness_examples is None:
        args.sharpness_examples = 1024
    if args.sharpness_iterations is None:
        args.sharpness_iterations = 20
    if args.model is None:
        args.model = DATASETS[args.dataset][0]
    if args.out is None:
        args.out = os.path.join(_HERE, "results", args.dataset)
    if args.sharpness_every < 0:
        parser.error("--sharpness-every must be >= 0")
    if any(s in INCREASING for s in args.schedules) and args.epochs % STAGES:
        parser.error(
            f"--epochs must be a positive multiple of {STAGES} when the grid has "
            f"an increasing-batch schedule ({', '.join(INCREASING)}): the batch "
            f"grows over {STAGES} equal stages; got --epochs {args.epochs}"
        )
    if args.dataset == "mnist1d" and args.model not in ("mnist1d_cnn",):
        parser.error(
            f"--model {args.model} does not take MNIST-1D's (40, 1) signals; "
            "for --dataset mnist1d use: mnist1d_cnn"
        )
    if args.dataset != "mnist1d" and args.model == "mnist1d_cnn":
        parser.error(
            f"--model mnist1d_cnn takes 1-D signals; for --dataset {args.dataset} "
            f"use one of: {', '.join(m for m in sorted(MODELS) if m != 'mnist1d_cnn')}"
        )
    if args.dataset == "mnist1d" and args.num_samples < 50:
        parser.error("--num-samples must be >= 50 for mnist1d")
    args.parser = parser
    return args


# ---------------------------------------------------------------------------
# Data.

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

        train, test = tfds.load(name, split=["train", "test"], as_supervised=True,
                                shuffle_files=False)
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
    return x.mean(axis=axes).astype(np.float32), np.maximum(
        x.std(axis=axes), 1e-6).astype(np.float32)


class Data:
    """Arrays plus the tf.data pipelines of one data set."""

    def __init__(self, dataset, num_samples, data_seed):
        self.dataset = dataset
        if dataset == "mnist1d":
            (self.x, self.y), (self.x_test, self.y_test) = load_mnist1d(
                num_samples, data_seed)
            self.image = False
            self.mean = self.std = None
        else:
            (self.x, self.y), (self.x_test, self.y_test) = load_cifar(
                dataset, num_samples)
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
                ds = ds.map(lambda x, y: (self.augment(x), y),
                            num_parallel_calls=tf.data.AUTOTUNE)
            ds = ds.map(lambda x, y: (self._normalize(x), y),
                        num_parallel_calls=tf.data.AUTOTUNE)
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
    """Rough peak host memory of the grid (runs are sequential, one model alive).

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
    model = MODELS[args.model](input_shape=input_shape, classes=classes)
    params = model.count_params()
    activations = 0
    for layer in model.layers:
        shape = getattr(getattr(layer, "output", None), "shape", None)
        if shape is not None:
            activations += int(np.prod([d for d in shape[1:] if d is not None]))
    del model
    keras.backend.clear_session()
    max_batch = args.batch
    if any(s in INCREASING for s in args.schedules):
        max_batch = max(max_batch, args.initial_batch * 2 ** (STAGES - 1))
    import tensorflow as tf

    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    total = 2 * data_bytes + 6 * 4 * params
    if not on_gpu:
        total += 3 * 4 * max_batch * activations
    return int(total), dict(data_bytes=data_bytes, params=params,
                            activations_per_example=activations,
                            max_batch=max_batch, on_gpu=on_gpu)


def check_memory(args):
    need, parts = estimate_memory_bytes(args)
    have = available_memory_bytes()
    if have is not None and need > have:
        raise SystemExit(
            f"error: the grid does not fit in memory: about {need / 2**30:.2f} GiB "
            f"estimated (data {parts['data_bytes'] / 2**30:.2f} GiB, "
            f"{args.model} with {parts['params']:,} parameters, largest batch "
            f"{parts['max_batch']}) but only {have / 2**30:.2f} GiB available "
            "(MemAvailable). Lower --num-samples, --batch / --initial-batch, or "
            "pick a smaller --model (choices: " + ", ".join(sorted(MODELS)) + ")."
        )
    return need, have


# ---------------------------------------------------------------------------
# One run.


def batch_schedule(args, schedule):
    if schedule in INCREASING:
        return keras_sam.callbacks.doubling_schedule(
            args.initial_batch, STAGES, args.epochs // STAGES)
    return {0: args.batch}


def run_name(method, schedule, seed):
    return f"{method}_{schedule}_seed{seed}"


def run_config(args):
    """What a stored run must match to be reused."""
    return {
        "dataset": args.dataset,
        "model": args.model,
        "epochs": args.epochs,
        "batch": args.batch,
        "initial_batch": args.initial_batch,
        "num_samples": args.num_samples,
        "data_seed": args.data_seed if args.dataset == "mnist1d" else None,
        "sharpness_examples": args.sharpness_examples,
        "sharpness_iterations": args.sharpness_iterations,
        "sharpness_every": args.sharpness_every,
        "lr": LR, "lr_final": LR_FINAL, "rho": RHO, "alpha": ALPHA,
        "sharpness_rho": SHARPNESS_RHO,
    }


def _float(value):
    return float(keras.ops.convert_to_numpy(value))


class _Recorder(keras.callbacks.Callback):
    def __init__(self, name, batch_sizes, measure, every):
        super().__init__()
        self.name = name
        self.batch_sizes = batch_sizes
        self.measure = measure
        self.every = every
        self.epochs = []
        self._last_iterations = 0
        self._t0 = None

    def on_train_begin(self, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        iterations = int(_float(self.model.optimizer.iterations))
        record = {
            "epoch": epoch + 1,
            "train_loss": float(logs.get("loss", float("nan"))),
            "test_loss": float(logs.get("val_loss", float("nan"))),
            "test_error": 1.0 - float(logs.get("val_accuracy", float("nan"))),
            "train_error": 1.0 - float(logs.get("accuracy", float("nan"))),
            "batch_size": int(logs.get("batch_size", self.batch_sizes[epoch])),
            "learning_rate": _float(self.model.optimizer.learning_rate),
            "iterations": iterations,
            "steps": iterations - self._last_iterations,
            "elapsed_s": time.perf_counter() - self._t0,
        }
        for key in ("sharpness", "grad_norm", "rho"):  # SAM's own logs
            if key in logs:
                record["sam_" + key] = float(logs[key])
        if "sam_fraction" in logs:  # share of SAM steps (sam_every, LookSAM, AE-SAM)
            record["sam_fraction"] = float(logs["sam_fraction"])
        self._last_iterations = iterations
        if self.every and (epoch + 1) % self.every == 0 and epoch + 1 < len(
                self.batch_sizes):
            record.update(self.measure())
        self.epochs.append(record)
        if EPOCH_HOOK is not None:
            EPOCH_HOOK(self.name, epoch)


WRAPPERS = {
    # method: how it wraps the network (benchmarks/efficient.py adds its own)
    "sgd": lambda inner: inner,
    "sam": lambda inner: keras_sam.SAMModel(inner, rho=RHO),
    "gsam": lambda inner: keras_sam.GSAMModel(inner, rho=RHO, alpha=ALPHA),
}


def train_one(args, data, method, schedule, seed, wrappers=None, callbacks=()):
    """Trains one grid point; returns its record (a JSON-able dict).

    `wrappers` maps method names to functions that wrap the network
    (default `WRAPPERS`); `callbacks` are added to `fit`'s."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    epochs = args.epochs
    sizes = batch_schedule(args, schedule)
    per_epoch_batch = []
    for e in range(epochs):
        per_epoch_batch.append(max(b for k, b in sizes.items() if k <= e))
    largest = max(per_epoch_batch)
    if data.num_train < largest:
        raise SystemExit(
            f"error: {data.num_train} training examples give no full batch of "
            f"{largest}; raise --num-samples or lower --batch / --initial-batch")

    scheduler = None
    if schedule in INCREASING:
        scheduler = keras_sam.callbacks.BatchSizeScheduler(
            sizes, lambda b: data.train_dataset(b, seed))
        steps = scheduler.steps_per_epoch(epochs)
    else:
        steps = keras_sam.schedules.steps_per_epoch(data.num_train, args.batch, epochs)
    if schedule in ("C", "BC"):
        lr = keras_sam.schedules.CosineAnnealing(LR, LR_FINAL, epochs, steps)
    elif schedule == "linear":
        lr = keras_sam.schedules.LinearDecay(LR, LR_FINAL, epochs, steps)
    else:
        lr = LR

    inner = MODELS[args.model](input_shape=data.input_shape, classes=data.classes)
    model = (WRAPPERS if wrappers is None else wrappers)[method](inner)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=lr, momentum=0.0),
        loss=loss, metrics=["accuracy"])

    k = min(args.sharpness_examples, data.num_train)
    sharp_data = (data.eval_arrays(data.x[:k]), data.y[:k])
    full_data = (data.eval_arrays(data.x), data.y)

    def measure():
        t = time.perf_counter()
        wcs = keras_sam.sharpness.worst_case_sharpness(
            inner, sharp_data, loss, rho=SHARPNESS_RHO,
            iterations=args.sharpness_iterations, batch_size=SHARPNESS_BATCH)
        gn = keras_sam.sharpness.full_gradient_norm(
            inner, full_data, loss, batch_size=500)
        return {"worst_case_sharpness": float(wcs), "full_gradient_norm": float(gn),
                "measure_s": time.perf_counter() - t}

    name = run_name(method, schedule, seed)
    recorder = _Recorder(name, per_epoch_batch, measure, args.sharpness_every)
    callbacks = ([scheduler] if scheduler else []) + [recorder] + list(callbacks)
    train_ds = data.train_dataset(per_epoch_batch[0], seed)
    t0 = time.perf_counter()
    model.fit(train_ds, epochs=epochs, validation_data=data.test_dataset(),
              callbacks=callbacks, verbose=0, shuffle=False)
    train_time = time.perf_counter() - t0
    final = measure()
    last = recorder.epochs[-1]
    last.update({key: final[key] for key in ("worst_case_sharpness",
                                              "full_gradient_norm")})
    return {
        "name": name,
        "method": method,
        "schedule": schedule,
        "seed": seed,
        "config": run_config(args),
        "steps_per_epoch": [int(s) for s in steps],
        "batch_schedule": {str(k): v for k, v in sizes.items()},
        "epochs": recorder.epochs,
        "final": {
            "test_error": last["test_error"],
            "train_loss": last["train_loss"],
            "worst_case_sharpness": final["worst_case_sharpness"],
            "full_gradient_norm": final["full_gradient_norm"],
            "train_time_s": train_time,
            "measure_time_s": final["measure_s"],
        },
        "normalization": None if data.mean is None else {
            "mean": data.mean.tolist(), "std": data.std.tolist()},
    }


# ---------------------------------------------------------------------------
# Files.


def write_atomic(path, text_or_bytes):
    tmp = f"{path}.tmp{os.getpid()}"
    mode = "wb" if isinstance(text_or_bytes, bytes) else "w"
    with open(tmp, mode) as f:
        f.write(text_or_bytes)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_run(path, config):
    """The stored run at `path`, or None if missing/unreadable.

    A stored run made with another configuration is an error (never
    overwritten silently)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None  # a corrupt file: rerun (written atomically, so rare)
    if record.get("config") != config:
        diff = {k: (record.get("config", {}).get(k), v) for k, v in config.items()
                if record.get("config", {}).get(k) != v}
        raise SystemExit(
            f"error: {path} was made with another configuration "
            f"(stored vs requested: {diff}); use another --out or delete it")
    return record


def _mean_std(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _fmt(mean, std, scale=1.0, digits=2):
    if mean is None:
        return "—"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _fmt_sci(mean, std):
    if mean is None:
        return "—"
    return f"{mean:.3g} ± {std:.2g}"


def summarize(args, runs):
    """Rows (method, schedule, stats) in grid order, from completed runs."""
    rows = []
    for method in args.methods:
        for schedule in args.schedules:
            rs = [r for r in runs if r["method"] == method and r["schedule"] == schedule]
            f = [r["final"] for r in rs]
            rows.append({
                "method": method, "schedule": schedule, "n": len(rs),
                "test_error": _mean_std([x["test_error"] for x in f]),
                "sharpness": _mean_std([x["worst_case_sharpness"] for x in f]),
                "grad_norm": _mean_std([x["full_gradient_norm"] for x in f]),
                "train_loss": _mean_std([x["train_loss"] for x in f]),
                "time": _mean_std([x["train_time_s"] for x in f]),
            })
    return rows


def table_markdown(rows):
    lines = [
        "| method | schedule | runs | test error % | worst-case sharpness | "
        "full-gradient norm | final train loss | train time s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['schedule']} | {r['n']} | "
            f"{_fmt(*r['test_error'], scale=100)} | {_fmt_sci(*r['sharpness'])} | "
            f"{_fmt_sci(*r['grad_norm'])} | {_fmt(*r['train_loss'], digits=3)} | "
            f"{_fmt(*r['time'], digits=1)} |")
    return "\n".join(lines) + "\n"


def machine_description():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = f"{platform.node()}: {platform.platform()}, {cpu}, {os.cpu_count()} CPU(s)"
    if gpus:
        text += f", GPUs: {', '.join(g.name for g in gpus)}"
    else:
        text += ", no GPU"
    return text


def versions():
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "keras_sam": keras_sam.__version__,
        "backend": keras.backend.backend(),
    }


SCHEDULE_TEXT = {
    "constant": "batch {batch}, lr 0.1",
    "B": "batch {b0}->{bmax} doubling over 5 equal stages, lr 0.1",
    "C": "batch {batch}, cosine lr 0.1->0.001 per step",
    "BC": "batch {b0}->{bmax} doubling + cosine lr 0.1->0.001 per step",
    "linear": "batch {batch}, linear lr 0.1->0.001 per step",
}


def write_report(args, runs, argv_used, total_expected, wall_s):
    out = args.out
    rows = summarize(args, runs)
    v = versions()
    fmt = dict(batch=args.batch, b0=args.initial_batch,
               bmax=args.initial_batch * 2 ** (STAGES - 1))
    cmd = "python benchmarks/paper.py" + (
        " " + " ".join(shlex.quote(a) for a in argv_used) if argv_used else "")
    md = [
        f"# Paper benchmark: {args.dataset} / {args.model}",
        "",
        f"- command: `{cmd}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {machine_description()}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- completed runs: {len(runs)} / {total_expected}"
        + (f"; wall time of this invocation {wall_s:.0f} s" if wall_s is not None else ""),
        f"- protocol: plain SGD (no momentum, no weight decay), lr {LR}, "
        f"SAM/GSAM rho {RHO} (constant), GSAM alpha {ALPHA}, cross-entropy, "
        f"last partial batch dropped; {args.epochs} epochs; "
        f"{'num_samples ' + str(args.num_samples) + ', ' if args.num_samples else ''}"
        f"seeds {','.join(map(str, args.seeds))}",
        "- schedules: " + "; ".join(
            f"{s}: {SCHEDULE_TEXT[s].format(**fmt)}" for s in args.schedules),
        f"- test error: after the last epoch; worst-case sharpness: L-inf Auto-PGD, "
        f"rho {SHARPNESS_RHO}, {args.sharpness_iterations} iterations, first "
        f"{args.sharpness_examples} training examples in batches of "
        f"{SHARPNESS_BATCH}, inference mode; full-gradient norm: "
        "||grad f_S(w)|| over the whole training set (no augmentation), "
        "inference mode. Train time: wall clock of `fit` (incl. per-epoch test "
        "evaluation and tracing). Mean ± std over seeds.",
        "",
        table_markdown(rows),
    ]
    write_atomic(os.path.join(out, "results.md"), "\n".join(md))
    summary = {
        "command": cmd, "versions": v, "machine": machine_description(),
        "config": run_config(args),
        "runs": sorted(runs, key=lambda r: (
            args.methods.index(r["method"]), args.schedules.index(r["schedule"]),
            r["seed"])),
    }
    write_atomic(os.path.join(out, "runs.json"), json.dumps(summary, indent=1))
    write_plots(args, runs)


def write_plots(args, runs):
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sgd": "tab:blue", "sam": "tab:orange", "gsam": "tab:green"}
    styles = {"constant": "-", "B": "--", "C": ":", "BC": "-.", "linear": (0, (5, 1, 1, 1, 1, 1))}
    groups = []
    for method in args.methods:
        for schedule in args.schedules:
            rs = [r for r in runs if r["method"] == method and r["schedule"] == schedule]
            if rs:
                groups.append((method, schedule, rs))
    if not groups:
        return

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        write_atomic(os.path.join(args.out, name), buf.getvalue())

    curves = [("train_loss", "training loss", True, "train_loss.png"),
              ("test_error", "test error", False, "test_error.png"),
              ("batch_size", "batch size", True, "batch_size.png"),
              ("learning_rate", "learning rate (end of epoch)", True, "learning_rate.png")]
    for key, label, log, fname in curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method, schedule, rs in groups:
            n = min(len(r["epochs"]) for r in rs)
            ys = np.array([[e[key] for e in r["epochs"][:n]] for r in rs], float)
            ax.plot(range(1, n + 1), ys.mean(axis=0), color=colors[method],
                    linestyle=styles[schedule], label=f"{method} {schedule}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.set_title(f"{label} ({args.dataset}, mean over seeds)")
        ax.legend(fontsize=7, ncol=3)
        ax.grid(alpha=0.3)
        save(fig, fname)

    for key, label, fname in (("worst_case_sharpness", "worst-case sharpness", "sharpness.png"),
                              ("full_gradient_norm", "full-gradient norm", "grad_norm.png")):
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(groups) + 2), 4.5))
        means, stds, labels, cols = [], [], [], []
        for method, schedule, rs in groups:
            vals = [r["final"][key] for r in rs]
            means.append(np.mean(vals))
            stds.append(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
            labels.append(f"{method}\n{schedule}")
            cols.append(colors[method])
        ax.bar(range(len(means)), means, yerr=stds, color=cols, capsize=3)
        ax.set_xticks(range(len(means)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.set_title(f"{label} after training ({args.dataset}, mean ± std over seeds)")
        ax.grid(alpha=0.3, axis="y")
        save(fig, fname)


# ---------------------------------------------------------------------------
# Main.


def _progress(text):
    print(text, file=sys.stderr, flush=True)


def main(argv=None):
    argv_used = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv_used)
    check_memory(args)
    runs_dir = os.path.join(args.out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    config = run_config(args)
    grid = [(m, s, k) for k in args.seeds for m in args.methods for s in args.schedules]
    total = len(grid)
    data = None
    durations = []
    stats = {"trained": 0, "skipped": 0}
    t_start = time.perf_counter()
    try:
        for i, (method, schedule, seed) in enumerate(grid, 1):
            name = run_name(method, schedule, seed)
            path = os.path.join(runs_dir, name + ".json")
            record = load_run(path, config)
            if record is not None:
                stats["skipped"] += 1
                _progress(f"[{i}/{total}] {method} {schedule} seed={seed}: "
                          "done before, skipped")
                continue
            remaining = sum(1 for g in grid[i - 1:]
                            if not os.path.exists(os.path.join(
                                runs_dir, run_name(*g) + ".json")))
            eta = (f"ETA {statistics.fmean(durations) * remaining / 60:.1f} min"
                   if durations else "ETA after the first run")
            _progress(f"[{i}/{total}] {method} {schedule} seed={seed}: training "
                      f"({remaining} left incl. this one, {eta})")
            if data is None:
                data = Data(args.dataset, args.num_samples, args.data_seed)
            t0 = time.perf_counter()
            record = train_one(args, data, method, schedule, seed)
            durations.append(time.perf_counter() - t0)
            record["run_time_s"] = durations[-1]
            write_atomic(path, json.dumps(record, indent=1))
            stats["trained"] += 1
            f = record["final"]
            _progress(f"[{i}/{total}] {method} {schedule} seed={seed}: "
                      f"test error {100 * f['test_error']:.2f}%, sharpness "
                      f"{f['worst_case_sharpness']:.3g}, grad norm "
                      f"{f['full_gradient_norm']:.3g}, {durations[-1]:.0f} s")
    finally:
        # The report covers every finished run of the grid on disk (also the
        # ones after an interruption point); a run in progress never counts.
        finished = []
        for g in grid:
            try:
                record = load_run(os.path.join(runs_dir, run_name(*g) + ".json"),
                                  config)
            except SystemExit:
                record = None
            if record is not None:
                finished.append(record)
        if finished:
            write_report(args, finished, argv_used, total,
                         time.perf_counter() - t_start)
    _progress(f"trained {stats['trained']}, skipped {stats['skipped']} of {total} "
              f"runs in {time.perf_counter() - t_start:.0f} s; results in {args.out}")
    return stats


if __name__ == "__main__":
    main()
