"""GSAM with an increasing batch size, data-parallel over several processes.

JAX backend + `keras.distribution`, the multi-process path Keras 3 supports.
Every process runs this same script with the same arguments except its
`--process-id`; every process builds the same FULL tf.data pipeline, batched
with the GLOBAL batch size, and Keras gives each process its slice of every
batch. The result is the same model as one process would train.

Quick try on one machine (starts the processes itself, on 127.0.0.1):

    python examples/multi_process.py --processes 2

On real hosts, run one process per host (or per accelerator group), the
coordinator being process 0's host and a free port on it:

    # host A (the coordinator)
    python examples/multi_process.py --coordinator hostA:1234 \
        --num-processes 2 --process-id 0
    # host B
    python examples/multi_process.py --coordinator hostA:1234 \
        --num-processes 2 --process-id 1

See README.md, "More than one machine".
"""

import argparse
import os
import socket
import subprocess
import sys
import time

os.environ["KERAS_BACKEND"] = "jax"  # the supported multi-process backend
from _quiet import import_tensorflow_quietly  # examples/_quiet.py

import_tensorflow_quietly()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--processes",
        type=int,
        default=None,
        help="start this many local processes on 127.0.0.1 "
        "and wait for them (quick try on one machine)",
    )
    parser.add_argument(
        "--coordinator", default=None, help="HOST:PORT of process 0 (one process per call)"
    )
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds before the local processes are killed"
    )
    return parser.parse_args()


# ---------------------------------------------------------------- launcher
def launch(args):
    """Starts `args.processes` copies of this script on 127.0.0.1, waits for
    them, and kills the rest when one fails (its peers would wait for it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = [
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        str(args.processes),
        "--epochs",
        str(args.epochs),
        "--num-samples",
        str(args.num_samples),
    ]
    procs = []
    try:
        for i in range(args.processes):
            procs.append(
                subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), *common, "--process-id", str(i)],
                    # only process 0 reports; the others' output is dropped
                    stdout=None if i == 0 else subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + args.timeout
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            if time.monotonic() > deadline:
                print(f"timed out after {args.timeout:.0f}s", file=sys.stderr)
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
    codes = [p.returncode for p in procs]
    if any(codes):
        sys.exit(f"process exit codes: {codes}")


# ------------------------------------------------------------------ worker
def train(args):
    import jax

    if args.num_processes > 1:
        # CPU processes talk through gloo; GPUs and TPUs need no such line.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import keras

    # The same seed everywhere, before initialize() (else the processes agree
    # on a random one, and it also seeds tf.data's shuffle).
    keras.utils.set_random_seed(0)
    if args.num_processes > 1:
        keras.distribution.initialize(
            job_addresses=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    devices = jax.devices()  # ALL devices, of every process
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))

    import tensorflow as tf

    import keras_sam
    from keras_sam.callbacks import BatchSizeScheduler

    (x, y), (x_test, y_test) = keras_sam.datasets.mnist1d(args.num_samples)

    def dataset_fn(batch_size):
        # The FULL pipeline, batched with the GLOBAL batch size, in every
        # process; drop_remainder so that every process gets a slice of
        # every batch.
        return (
            tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(len(x), seed=0)
            .batch(batch_size, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE)
        )

    # Global batch sizes: each must divide by the number of devices.
    stage = max(1, args.epochs // 3)
    schedule = {0: 32, stage: 64, 2 * stage: 128}
    scheduler = BatchSizeScheduler(schedule, dataset_fn)
    lr = keras_sam.schedules.CosineAnnealing(
        0.1, 0.001, epochs=args.epochs, steps_per_epoch=scheduler.steps_per_epoch(args.epochs)
    )

    inner = keras.Sequential(
        [
            keras.Input((40, 1)),
            keras.layers.Conv1D(32, 5, padding="same", activation="relu"),
            keras.layers.Conv1D(32, 5, strides=2, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(10),
        ]
    )
    model = keras_sam.GSAMModel(inner, rho=0.05, alpha=0.02, sync_perturbation=True)
    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    chief = jax.process_index() == 0
    history = model.fit(
        dataset_fn(schedule[0]),
        epochs=args.epochs,
        callbacks=[scheduler],
        shuffle=False,
        verbose=2 if chief else 0,
    )
    test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(200, drop_remainder=True)
    _, accuracy = model.evaluate(test, verbose=0)
    if chief:
        print(f"processes: {jax.process_count()}, devices: {len(devices)}")
        print(f"batch sizes per epoch: {history.history['batch_size']}")
        print(f"steps per epoch: {scheduler.steps_per_epoch(args.epochs)}")
        print(f"test accuracy: {accuracy:.4f}")


def main():
    args = parse_args()
    if args.processes is not None:
        if args.processes < 1:
            sys.exit("--processes must be >= 1")
        launch(args)
    else:
        if args.num_processes > 1 and not args.coordinator:
            sys.exit("--num-processes > 1 needs --coordinator HOST:PORT")
        train(args)


if __name__ == "__main__":
    main()
