"""One run of the grid (model, fit, measures) and the run files.

A run is stored as `runs/<method>_<schedule>_seed<k>.json` only once it has
finished (written atomically: a temporary file, fsync, rename), so an
interrupted or failed run never replaces or corrupts a stored one.
"""

import json
import lzma
import os
import time

import keras

import keras_sam
from benchmarks.paper import verdicts as verdicts_lib
from benchmarks.paper.protocol import ADAPTIVE
from benchmarks.paper.protocol import ADAPTIVE_FACTOR
from benchmarks.paper.protocol import ADAPTIVE_MIN_EPOCHS
from benchmarks.paper.protocol import ADAPTIVE_THRESHOLD
from benchmarks.paper.protocol import ALPHA
from benchmarks.paper.protocol import GRADIENT_NORM_BATCH
from benchmarks.paper.protocol import GROWN
from benchmarks.paper.protocol import INCREASING
from benchmarks.paper.protocol import LR
from benchmarks.paper.protocol import LR_FINAL
from benchmarks.paper.protocol import MODELS
from benchmarks.paper.protocol import NOISE_SCALE
from benchmarks.paper.protocol import NOISE_SCALE_DECAY
from benchmarks.paper.protocol import PLATEAU
from benchmarks.paper.protocol import PLATEAU_COOLDOWN
from benchmarks.paper.protocol import PLATEAU_MIN_DELTA
from benchmarks.paper.protocol import PLATEAU_MONITOR
from benchmarks.paper.protocol import PLATEAU_PATIENCE
from benchmarks.paper.protocol import RHO
from benchmarks.paper.protocol import SHARPNESS_BATCH
from benchmarks.paper.protocol import SHARPNESS_RHO
from benchmarks.paper.protocol import STAGES
from benchmarks.paper.protocol import STEPS_CONTROL


def batch_schedule(args, schedule):
    """`{epoch: batch_size}` of a schedule, or the `AdaptiveBatchSize` /
    `BatchSizeOnPlateau` of a grown one, for `BatchSizeScheduler`."""
    if schedule in PLATEAU:
        return keras_sam.callbacks.BatchSizeOnPlateau(
            args.initial_batch,
            factor=ADAPTIVE_FACTOR,
            max_batch_size=args.initial_batch * 2 ** (STAGES - 1),
            **{key[len("plateau_") :]: value for key, value in PLATEAU_CONFIG.items()},
        )
    if schedule in ADAPTIVE:
        return keras_sam.callbacks.AdaptiveBatchSize(
            args.initial_batch,
            max_batch_size=args.initial_batch * 2 ** (STAGES - 1),
            factor=ADAPTIVE_FACTOR,
            threshold=ADAPTIVE_THRESHOLD,
            min_epochs=ADAPTIVE_MIN_EPOCHS,
        )
    if schedule in INCREASING:
        return keras_sam.callbacks.doubling_schedule(
            args.initial_batch, STAGES, args.epochs // STAGES
        )
    return {0: args.batch}


def steps_of(args, schedule, num_train, epochs=None):
    """Optimizer steps of each epoch of `schedule` over `num_train` examples."""
    epochs = args.epochs if epochs is None else epochs
    return keras_sam.BatchSchedule(batch_schedule(args, schedule)).steps_per_epoch(
        num_train, epochs
    )


def schedule_epochs(args, schedule, num_train):
    """Epochs of a schedule: `args.epochs`, except the steps-matched control,
    which trains the constant batch for the fewest whole epochs that give at
    least as many optimizer steps as B (at most one epoch more)."""
    if schedule != STEPS_CONTROL:
        return args.epochs
    target = sum(steps_of(args, "B", num_train))
    per_epoch = num_train // args.batch
    if per_epoch == 0:
        raise SystemExit(
            f"error: {num_train} training examples give no full batch of "
            f"{args.batch}; raise --num-samples or lower --batch"
        )
    return -(-target // per_epoch)


def run_name(method, schedule, seed):
    return f"{method}_{schedule}_seed{seed}"


EXTEND_KEY = "extend_until_converged"


def run_config(args):
    """What a stored run must match to be reused."""
    return {
        EXTEND_KEY: float(getattr(args, EXTEND_KEY, 0.0)),
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
        "lr": LR,
        "lr_final": LR_FINAL,
        "rho": RHO,
        "alpha": ALPHA,
        "sharpness_rho": SHARPNESS_RHO,
        **ADAPTIVE_CONFIG,
        **PLATEAU_CONFIG,
    }


ADAPTIVE_CONFIG = {
    "adaptive_threshold": ADAPTIVE_THRESHOLD,
    "adaptive_factor": ADAPTIVE_FACTOR,
    "adaptive_min_epochs": ADAPTIVE_MIN_EPOCHS,
    "noise_scale_decay": NOISE_SCALE_DECAY,
}
"""The adaptive schedules' constants (runs stored before they existed hold
none, and did not depend on them: `normalized_config`)."""

PLATEAU_CONFIG = {
    "plateau_monitor": PLATEAU_MONITOR,
    "plateau_patience": PLATEAU_PATIENCE,
    "plateau_min_delta": PLATEAU_MIN_DELTA,
    "plateau_cooldown": PLATEAU_COOLDOWN,
}
"""The plateau schedules' constants (the same for runs stored before)."""


# ---------------------------------------------------------------------------
# Training.


def _float(value):
    return float(keras.ops.convert_to_numpy(value))


class EpochLog(keras.callbacks.Callback):
    """One record per epoch: losses and errors from `logs`, the batch size,
    the learning rate and step count read from the optimizer, the wall time
    since `fit` began, and SAM's own logs. Sharpness measures are added by
    `train_one` from the `SharpnessMonitor`s."""

    def __init__(self, batch_size_at):
        super().__init__()
        self.batch_size_at = batch_size_at
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
            "batch_size": int(logs.get("batch_size", self.batch_size_at(epoch))),
            "learning_rate": _float(self.model.optimizer.learning_rate),
            "iterations": iterations,
            "steps": iterations - self._last_iterations,
            "elapsed_s": time.perf_counter() - self._t0,
        }
        for key in ("sharpness", "grad_norm", "rho"):  # SAM's own logs
            if key in logs:
                record["sam_" + key] = float(logs[key])
        if "noise_scale" in logs:  # the estimate (adaptive and measured schedules)
            record["noise_scale"] = float(logs["noise_scale"])
        if "next_batch_size" in logs:
            record["next_batch_size"] = int(logs["next_batch_size"])
        if "sam_fraction" in logs:  # share of SAM steps (sam_every, LookSAM, AE-SAM)
            record["sam_fraction"] = float(logs["sam_fraction"])
        self._last_iterations = iterations
        self.epochs.append(record)


class StopWhenConverged(keras.callbacks.Callback):
    """Ends `fit` at the first epoch from `epochs` on (1-based) at which the
    training losses in `log` meet the convergence criterion; `fit` is given
    the most epochs the run may take. Until `epochs`, training is exactly
    that of `fit(epochs=epochs)`."""

    def __init__(self, epochs, log):
        super().__init__()
        self.epochs, self.log = epochs, log

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 >= self.epochs and verdicts_lib.convergence_of(self.log.epochs)["converged"]:
            self.model.stop_training = True


class _Monitor(keras_sam.callbacks.SharpnessMonitor):
    """`SharpnessMonitor` that leaves the last epoch out (`train_one`
    measures after `fit`, outside the training time) and times each
    measurement (`seconds[epoch]`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seconds = {}

    def should_measure(self, epoch):
        return super().should_measure(epoch) and epoch + 1 < self.params["epochs"]

    def on_epoch_end(self, epoch, logs=None):
        t = time.perf_counter()
        super().on_epoch_end(epoch, logs)
        if epoch in self.results:
            self.seconds[epoch] = time.perf_counter() - t


WRAPPERS = {
    # method: how it wraps the network (benchmarks/efficient.py adds its own)
    "sgd": lambda inner: inner,
    "sam": lambda inner: keras_sam.SAMModel(inner, rho=RHO),
    "gsam": lambda inner: keras_sam.GSAMModel(inner, rho=RHO, alpha=ALPHA),
}

NOISE_SCALE_WRAPPERS = {
    # The same methods with the noise scale estimate (SGD: rho 0 is plain SGD).
    "sgd": lambda inner: keras_sam.SAMModel(
        inner, rho=0.0, noise_scale=True, noise_scale_decay=NOISE_SCALE_DECAY
    ),
    "sam": lambda inner: keras_sam.SAMModel(
        inner, rho=RHO, noise_scale=True, noise_scale_decay=NOISE_SCALE_DECAY
    ),
    "gsam": lambda inner: keras_sam.GSAMModel(
        inner, rho=RHO, alpha=ALPHA, noise_scale=True, noise_scale_decay=NOISE_SCALE_DECAY
    ),
}


def plain_sgd(learning_rate):
    """The paper's optimizer: SGD without momentum."""
    return keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.0)


def train_one(args, data, method, schedule, seed, wrappers=None, callbacks=(), optimizer=plain_sgd):
    """Trains one grid point; returns its record (a JSON-able dict).

    `wrappers` maps method names to functions that wrap the network
    (default `WRAPPERS`); `callbacks` are added to `fit`'s; `optimizer(lr)`
    makes the optimizer from the schedule's learning rate (default the
    paper's plain SGD)."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    epochs = schedule_epochs(args, schedule, data.num_train)
    sizes = batch_schedule(args, schedule)
    scheduler = keras_sam.callbacks.BatchSizeScheduler(sizes, lambda b: data.train_dataset(b, seed))
    batch_size_at = scheduler.batch_size_at  # the scheduler's own lookup
    largest = (
        sizes.max_batch_size if schedule in GROWN else max(batch_size_at(e) for e in range(epochs))
    )
    if data.num_train < largest:
        raise SystemExit(
            f"error: {data.num_train} training examples give no full batch of "
            f"{largest}; raise --num-samples or lower --batch / --initial-batch"
        )

    if schedule in INCREASING + GROWN:
        # Grown: the steps if the batch never grew; the scheduler gives
        # the rate the real ones as it grows.
        steps = scheduler.steps_per_epoch(epochs)
    else:
        scheduler = None  # one batch size: fit's own data, no callback
        steps = keras_sam.schedules.steps_per_epoch(data.num_train, args.batch, epochs)
    if schedule in ("C", "BC", "adaptive_C", "plateau_C"):
        lr = keras_sam.schedules.CosineAnnealing(LR, LR_FINAL, epochs, steps)
    elif schedule == "linear":
        lr = keras_sam.schedules.LinearDecay(LR, LR_FINAL, epochs, steps)
    else:
        lr = LR

    inner = MODELS[args.model](input_shape=data.input_shape, classes=data.classes)
    if wrappers is None:
        wrappers = NOISE_SCALE_WRAPPERS if schedule in NOISE_SCALE else WRAPPERS
    model = wrappers[method](inner)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # Several steps per call of the compiled function: the same steps in the
    # same order (bitwise equal results, tested), less Python per step.
    model.compile(
        optimizer=optimizer(lr),
        loss=loss,
        metrics=["accuracy"],
        steps_per_execution=getattr(args, "steps_per_execution", 1),
    )

    # Worst-case sharpness on the first k training examples, the gradient
    # norm on all of them; every `--sharpness-every` epochs during training
    # (0: never) and always after it.
    k = min(args.sharpness_examples, data.num_train)
    every = max(args.sharpness_every, 1)
    monitors = [
        _Monitor(
            (data.eval_arrays(data.x[:k]), data.y[:k]),
            loss=loss,
            every=every,
            measures="worst_case_sharpness",
            rho=SHARPNESS_RHO,
            iterations=args.sharpness_iterations,
            batch_size=SHARPNESS_BATCH,
        ),
        _Monitor(
            (data.eval_arrays(data.x), data.y),
            loss=loss,
            every=every,
            measures="full_gradient_norm",
            batch_size=GRADIENT_NORM_BATCH,
        ),
    ]
    log = EpochLog(batch_size_at)
    fit_callbacks = ([scheduler] if scheduler else []) + [log]
    # Past its epochs a run trains on only while its loss still moves.
    most_epochs = epochs + int(getattr(args, EXTEND_KEY, 0.0) * epochs)
    if most_epochs > epochs:
        fit_callbacks.append(StopWhenConverged(epochs, log))
    if args.sharpness_every:
        fit_callbacks += monitors
    fit_callbacks += list(callbacks)
    train_ds = data.train_dataset(batch_size_at(0), seed)
    t0 = time.perf_counter()
    model.fit(
        train_ds,
        epochs=most_epochs,
        validation_data=data.test_dataset(),
        callbacks=fit_callbacks,
        verbose=0,
        shuffle=False,
    )
    train_time = time.perf_counter() - t0

    for epoch, record in enumerate(log.epochs):
        measured = [m for m in monitors if epoch in m.results]
        for m in measured:
            record.update(m.results[epoch])
        if measured:
            record["measure_s"] = sum(m.seconds[epoch] for m in measured)
    # The trained model as fit saw it (a SAM wrapper measures as its inner
    # network, and the monitors' compiled functions are cached per model).
    t = time.perf_counter()
    final = {}
    for m in monitors:
        final.update(m.measure(model))
    measure_s = time.perf_counter() - t
    last = log.epochs[-1]
    last.update(final)
    return {
        "name": run_name(method, schedule, seed),
        "method": method,
        "schedule": schedule,
        "seed": seed,
        "config": run_config(args),
        "steps_per_epoch": [int(e["steps"]) for e in log.epochs],
        "base_epochs": int(epochs),
        "examples": int(sum(e["steps"] * e["batch_size"] for e in log.epochs)),
        # The changes: scheduled, or decided during training.
        "batch_schedule": {
            str(k): v for k, v in (sizes.history if schedule in GROWN else sizes).items()
        },
        "intra_op_threads": intra_op_threads(),
        "epochs": log.epochs,
        "final": {
            "test_error": last["test_error"],
            "train_loss": last["train_loss"],
            "worst_case_sharpness": final["worst_case_sharpness"],
            "full_gradient_norm": final["full_gradient_norm"],
            "train_time_s": train_time,
            "steps": int(sum(e["steps"] for e in log.epochs)),
            "examples": int(sum(e["steps"] * e["batch_size"] for e in log.epochs)),
            "measure_time_s": measure_s,
        },
        "normalization": None
        if data.mean is None
        else {"mean": data.mean.tolist(), "std": data.std.tolist()},
    }


def intra_op_threads():
    """TensorFlow's intra-op threads in this process (0: one per core). The
    results depend on it at the rounding level (reductions split by thread)."""
    import tensorflow as tf

    return int(tf.config.threading.get_intra_op_parallelism_threads())


# ---------------------------------------------------------------------------
# Run files.


def write_atomic(path, text_or_bytes):
    """Writes `path` whole or not at all: a temporary file in the same
    folder, flushed to disk, then renamed over `path`. On an error the
    temporary file is removed and `path` keeps its old content."""
    tmp = f"{path}.tmp{os.getpid()}"
    mode = "wb" if isinstance(text_or_bytes, bytes) else "w"
    try:
        with open(tmp, mode) as f:
            f.write(text_or_bytes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


RUN_SUFFIX = ".json.xz"
"""A run's file: its record as compact JSON, xz-compressed (a tenth of the
indented JSON's size; `xz -dc name.json.xz` shows it). Files ending in
`.json` (written before) are read too."""


def run_path(runs_dir, method, schedule, seed):
    return named_run_path(runs_dir, run_name(method, schedule, seed))


def named_run_path(runs_dir, name):
    """The file of run `name` in `runs_dir`: `name.json.xz`, or an existing
    `name.json` written before runs were compressed."""
    legacy = os.path.join(runs_dir, name + ".json")
    path = os.path.join(runs_dir, name + RUN_SUFFIX)
    return legacy if os.path.exists(legacy) and not os.path.exists(path) else path


def store_run(path, record):
    """Stores a finished run (serialized first, so a record that cannot be
    written leaves no file): xz-compressed for a `.xz` path."""
    if path.endswith(".xz"):
        text = json.dumps(record, separators=(",", ":"))
        write_atomic(path, lzma.compress(text.encode(), preset=9))
    else:
        write_atomic(path, json.dumps(record, indent=1))


def read_run(path):
    """The record at `path` (`.json` or `.json.xz`), or None if missing or
    unreadable."""
    if not os.path.exists(path):
        return None
    try:
        if path.endswith(".xz"):
            with lzma.open(path, "rt") as f:
                return json.load(f)
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError, lzma.LZMAError, EOFError):
        return None  # a corrupt file: rerun (written atomically, so rare)


def load_run(path, config):
    """The stored run at `path`, or None if missing/unreadable.

    A stored run made with another configuration is an error (never
    overwritten silently)."""
    record = read_run(path)
    if record is None:
        return None
    stored = normalized_config(record.get("config", {}))
    if stored != config:
        if _without_extension(stored) == _without_extension(config) and converged_at_its_epochs(
            record
        ):
            # Trained with another extension rule but never extended: the
            # same run under this one. Stored again with this configuration.
            record["config"] = dict(config)
            store_run(path, record)
            return record
        diff = {k: (stored.get(k), v) for k, v in config.items() if stored.get(k) != v}
        raise SystemExit(
            f"error: {path} was made with another configuration "
            f"(stored vs requested: {diff}); use another --out or delete it"
        )
    record["config"] = stored
    return record


def normalized_config(config):
    """A stored configuration; runs stored before the extension rule existed
    were never extended (`extend_until_converged` 0), and those stored before
    the adaptive and plateau schedules did not depend on their constants."""
    return {EXTEND_KEY: 0.0, **ADAPTIVE_CONFIG, **PLATEAU_CONFIG, **config}


def _without_extension(config):
    return {k: v for k, v in config.items() if k != EXTEND_KEY}


def converged_at_its_epochs(record):
    """Met the convergence criterion after exactly its planned epochs (so no
    extension rule would have trained it on)."""
    epochs = record["epochs"]
    planned = record.get("base_epochs", len(epochs))
    return len(epochs) == planned and verdicts_lib.convergence_of(epochs)["converged"]


def stored_runs(runs_dir):
    """Every readable run record in `runs_dir` (by file name)."""
    if not os.path.isdir(runs_dir):
        return []
    records = []
    for name in sorted(os.listdir(runs_dir)):
        if name.endswith((".json", RUN_SUFFIX)):
            record = read_run(os.path.join(runs_dir, name))
            if isinstance(record, dict) and "config" in record and "final" in record:
                record["config"] = normalized_config(record["config"])
                records.append(record)
    return records
