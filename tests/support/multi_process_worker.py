"""One process of a multi-process (JAX + keras.distribution) training run.

Used by tests/cross_backend/test_multi_process.py, which starts it once alone (the
one-process reference) and N times together (N processes on 127.0.0.1):

    python tests/support/multi_process_worker.py --out OUT.npz \
        [--processes N --process-id I --port PORT] [--cases sam,gsam,ramp]

Every process builds the same model (weights from a NumPy seed) and the same
FULL tf.data pipeline, batched with the GLOBAL batch size; Keras gives each
process its slice. Cases:

- `sam`: SAMModel, global batch 8, 2 epochs;
- `gsam`: GSAMModel with a cosine learning rate, global batch 8, 2 epochs;
- `ramp`: SAMModel + BatchSizeScheduler {0: 4, 1: 8, 3: 16} over 4 epochs,
  interrupted at the start of epoch 2 and resumed with BackupAndRestore;
- `adaptive`: SAMModel with `noise_scale=True` + BatchSizeScheduler with an
  AdaptiveBatchSize (4 -> 16) and a cosine rate over 4 epochs;
- `late`: SAMModel with `sam_every=3` and `sam_start_epoch=1` (the kinds of
  step chosen on the host in every process), global batch 8, 3 epochs;
- `errors` (several processes only): the scheduler's checks that stop a
  multi-process fit before its first step (their messages are saved).

The SAM models use `sync_perturbation=True` (one perturbation from the global
batch), so the result does not depend on how many devices share a batch.

Writes, per case, the final weights, the batches each epoch ran, the
optimizer's iterations and the logged batch sizes to `--out` (an .npz).
Exits with 3 when gloo CPU collectives are not available in this jax.
"""

import argparse
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

NO_GLOO = 3  # exit status: this jax has no gloo CPU collectives

N = 64
RAMP = {0: 4, 1: 8, 3: 16}
RAMP_EPOCHS = 4
ADAPTIVE_THRESHOLD = 0.05
INTERRUPT_AT = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cases", default="sam,gsam,ramp")
    parser.add_argument(
        "--backup-dir",
        default=None,
        help="BackupAndRestore folder (ramp case); default: next to --out, one per process",
    )
    return parser.parse_args(argv)


def setup_distribution(processes, process_id, port):
    """gloo collectives, keras.distribution.initialize, DataParallel."""
    import jax

    if processes > 1:
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except Exception as e:  # an old or new jax without the option
            print(f"no gloo CPU collectives: {e}", file=sys.stderr)
            sys.exit(NO_GLOO)
    import keras

    # The same seed in every process and in the one-process run, BEFORE
    # initialize(): without one, initialize() agrees on a random seed across
    # the processes and sets it as TensorFlow's global seed too, so a seeded
    # `shuffle` would give another order than a one-process run.
    keras.utils.set_random_seed(0)
    if processes > 1:
        keras.distribution.initialize(
            job_addresses=f"127.0.0.1:{port}",
            num_processes=processes,
            process_id=process_id,
        )
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))


def data():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 4)).astype("float32")
    y = np.tanh(x @ np.array([[1.0], [-2.0], [0.5], [0.3]], "float32"))
    return x, y.astype("float32")


def dataset_fn(batch_size):
    """The full pipeline, batched with the GLOBAL batch size (every process)."""
    import tensorflow as tf

    x, y = data()
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(N, seed=1)  # the same order in every process, every run
        .batch(batch_size, drop_remainder=True)
    )


def inner_model():
    import keras
    import numpy as np

    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    rng = np.random.default_rng(2)
    model.set_weights(
        [rng.normal(scale=0.5, size=w.shape).astype("float32") for w in model.get_weights()]
    )
    return model


class Record:
    """Batches run per epoch, iterations at each epoch end, batch sizes."""

    def __init__(self):
        import keras

        record = self

        class _Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                record.epoch = epoch
                record.batches[epoch] = 0
                record.params_steps[epoch] = self.params.get("steps") or -1

            def on_train_batch_end(self, batch, logs=None):
                record.batches[record.epoch] += 1

            def on_epoch_end(self, epoch, logs=None):
                record.iterations[epoch] = int(
                    keras.ops.convert_to_numpy(self.model.optimizer.iterations)
                )
                if logs and "batch_size" in logs:
                    record.batch_size[epoch] = int(logs["batch_size"])
                if logs and "noise_scale" in logs:
                    record.noise_scale[epoch] = float(logs["noise_scale"])
                if logs and "sam_fraction" in logs:
                    record.sam_fraction[epoch] = float(logs["sam_fraction"])

        self.epoch = None
        self.batches = {}
        self.params_steps = {}
        self.iterations = {}
        self.batch_size = {}
        self.noise_scale = {}
        self.sam_fraction = {}
        self.callback = _Callback()

    def arrays(self, prefix):
        import numpy as np

        epochs = sorted(self.batches)
        out = {
            f"{prefix}/epochs": np.array(epochs),
            f"{prefix}/batches": np.array([self.batches[e] for e in epochs]),
            f"{prefix}/params_steps": np.array([self.params_steps[e] for e in epochs]),
            f"{prefix}/iterations": np.array([self.iterations.get(e, -1) for e in epochs]),
        }
        if self.batch_size:
            out[f"{prefix}/batch_size"] = np.array([self.batch_size.get(e, -1) for e in epochs])
        if self.noise_scale:
            out[f"{prefix}/noise_scale"] = np.array([self.noise_scale[e] for e in epochs])
        if self.sam_fraction:
            out[f"{prefix}/sam_fraction"] = np.array([self.sam_fraction[e] for e in epochs])
        return out


def _weights(prefix, model):
    return {f"{prefix}/w{i}": w for i, w in enumerate(model.get_weights())}


def run_sam():
    import keras

    import keras_sam

    model = keras_sam.SAMModel(inner_model(), rho=0.1, sync_perturbation=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    record = Record()
    model.fit(dataset_fn(8), epochs=2, verbose=0, shuffle=False, callbacks=[record.callback])
    return {**_weights("sam", model), **record.arrays("sam")}


def run_late():
    import keras

    import keras_sam

    model = keras_sam.SAMModel(
        inner_model(), rho=0.1, sync_perturbation=True, sam_every=3, sam_start_epoch=1
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    record = Record()
    model.fit(dataset_fn(8), epochs=3, verbose=0, shuffle=False, callbacks=[record.callback])
    return {**_weights("late", model), **record.arrays("late")}


def run_gsam():
    import keras

    import keras_sam

    steps = N // 8
    lr = keras_sam.schedules.CosineAnnealing(0.1, 0.001, epochs=2, steps_per_epoch=steps)
    model = keras_sam.GSAMModel(
        inner_model(), rho=0.1, alpha=0.3, rho_min=0.01, sync_perturbation=True
    )
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    record = Record()
    model.fit(dataset_fn(8), epochs=2, verbose=0, shuffle=False, callbacks=[record.callback])
    return {**_weights("gsam", model), **record.arrays("gsam")}


def run_adaptive():
    """SAM with the noise scale estimate and an AdaptiveBatchSize: every
    process must measure the same noise scale and decide the same sizes."""
    import keras

    import keras_sam
    from keras_sam.callbacks import AdaptiveBatchSize
    from keras_sam.callbacks import BatchSizeScheduler

    policy = AdaptiveBatchSize(4, max_batch_size=16, threshold=ADAPTIVE_THRESHOLD)
    scheduler = BatchSizeScheduler(policy, dataset_fn)
    steps = scheduler.steps_per_epoch(RAMP_EPOCHS)
    lr = keras_sam.schedules.CosineAnnealing(0.1, 0.01, epochs=RAMP_EPOCHS, steps_per_epoch=steps)
    model = keras_sam.SAMModel(
        inner_model(), rho=0.1, sync_perturbation=True, noise_scale=True, noise_scale_decay=0.8
    )
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9), loss="mse")
    record = Record()
    model.fit(
        dataset_fn(4),
        epochs=RAMP_EPOCHS,
        verbose=0,
        shuffle=False,
        callbacks=[scheduler, record.callback],
    )
    return {**_weights("adaptive", model), **record.arrays("adaptive")}


def run_ramp(backup_dir):
    import keras
    from interrupts import Interrupt  # tests/, this script's folder
    from interrupts import InterruptAt

    import keras_sam
    from keras_sam.callbacks import BatchSizeScheduler

    def build(steps):
        lr = keras_sam.schedules.CosineAnnealing(
            0.1, 0.01, epochs=RAMP_EPOCHS, steps_per_epoch=steps
        )
        model = keras_sam.SAMModel(inner_model(), rho=0.1, sync_perturbation=True)
        model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9), loss="mse")
        return model

    scheduler = BatchSizeScheduler(RAMP, dataset_fn)
    steps = scheduler.steps_per_epoch(RAMP_EPOCHS)
    backup = keras.callbacks.BackupAndRestore(backup_dir)
    record = Record()
    callbacks = [scheduler, backup, record.callback, InterruptAt(INTERRUPT_AT)]
    model = build(steps)
    try:
        model.fit(
            dataset_fn(RAMP[0]), epochs=RAMP_EPOCHS, verbose=0, shuffle=False, callbacks=callbacks
        )
        raise AssertionError("the ramp run was not interrupted")
    except Interrupt:
        pass
    interrupted_iterations = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    model = build(steps)  # a fresh model, as after a crash
    history = model.fit(
        dataset_fn(RAMP[0]), epochs=RAMP_EPOCHS, verbose=0, shuffle=False, callbacks=callbacks
    )
    import numpy as np

    return {
        **_weights("ramp", model),
        **record.arrays("ramp"),
        "ramp/steps": np.array(steps),
        "ramp/interrupted_iterations": np.array(interrupted_iterations),
        "ramp/resumed_epochs": np.array(history.epoch),
    }


def run_errors():
    """What the scheduler refuses across processes, before any step."""
    import numpy as np
    import tensorflow as tf

    import keras_sam
    from keras_sam.callbacks import BatchSizeScheduler

    def no_drop_remainder(batch_size):
        x, y = data()
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)

    cases = {
        "odd_batch": ({0: 4, 1: 5}, dataset_fn, dataset_fn(4)),
        "partial_batch": ({0: 4}, no_drop_remainder, no_drop_remainder(4)),
        "per_process_data": ({0: 8}, dataset_fn, dataset_fn(4)),
    }
    out = {}
    for name, (schedule, fn, fit_data) in cases.items():
        model = keras_sam.SAMModel(inner_model(), rho=0.1)
        model.compile(optimizer="sgd", loss="mse")
        before = [w.copy() for w in model.get_weights()]
        try:
            model.fit(
                fit_data,
                epochs=2,
                verbose=0,
                shuffle=False,
                callbacks=[BatchSizeScheduler(schedule, fn)],
            )
            message = "no error"
        except ValueError as e:
            message = str(e)
        unchanged = all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
        out[f"errors/{name}"] = np.array(message)
        out[f"errors/{name}_unchanged"] = np.array(unchanged)
    return out


def main(argv=None):
    args = parse_args(argv)
    setup_distribution(args.processes, args.process_id, args.port)
    import numpy as np

    results = {}
    cases = [c for c in args.cases.split(",") if c]
    for case in cases:
        if case == "sam":
            results.update(run_sam())
        elif case == "gsam":
            results.update(run_gsam())
        elif case == "late":
            results.update(run_late())
        elif case == "ramp":
            backup_dir = args.backup_dir or (
                f"{os.path.splitext(args.out)[0]}.backup{args.process_id}"
            )
            results.update(run_ramp(backup_dir))
        elif case == "adaptive":
            results.update(run_adaptive())
        elif case == "errors":
            results.update(run_errors())
        else:
            raise SystemExit(f"unknown case {case!r}")
    np.savez(args.out, **results)
    print(f"process {args.process_id}/{args.processes}: wrote {args.out}")


if __name__ == "__main__":
    main()
