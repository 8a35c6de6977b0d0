"""Multi-process data-parallel training: JAX + keras.distribution on 127.0.0.1.

`tests/support/multi_process_worker.py` trains SAM, GSAM and a BatchSizeScheduler
ramp (interrupted and resumed with BackupAndRestore) once in ONE process and
once in TWO processes that share each global batch (gloo CPU collectives).
Both runs start together; every process gets a timeout and is killed in a
`finally`, also when a test fails. Whatever the backend pytest runs on, the
workers run on JAX.

The MultiWorkerMirroredStrategy test runs a single-worker strategy (TF_CONFIG
on 127.0.0.1) in a TensorFlow subprocess.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from other_backends import subprocess_env
from paths import ROOT
from paths import SUPPORT

WORKER = os.path.join(SUPPORT, "multi_process_worker.py")
PROCESSES = 2
TIMEOUT = 300  # seconds, for each process
NO_GLOO = 3  # the worker's exit status when jax has no gloo collectives

RAMP_SIZES = [4, 8, 8, 16]  # {0: 4, 1: 8, 3: 16} over 4 epochs, 64 examples
RAMP_STEPS = [64 // b for b in RAMP_SIZES]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(backend):
    return dict(subprocess_env(backend), TF_CPP_MIN_LOG_LEVEL="2")


def _start(args, log_path, backend="jax"):
    log = open(log_path, "w")
    try:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=_env(backend),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    finally:
        log.close()  # the child keeps its own handle


def _tail(path, n=3000):
    with open(path) as f:
        return f.read()[-n:]


def _wait_all(procs, logs, timeout):
    """Waits for every process; kills them all on timeout or first failure."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                break  # the others would wait forever for their peer
            if time.monotonic() > deadline:
                pytest.fail(
                    f"multi-process run over {timeout}s:\n" + "\n".join(_tail(log) for log in logs)
                )
            time.sleep(0.2)
    finally:
        for p in procs:  # only the processes this test started
            if p.poll() is None:
                p.kill()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
    codes = [p.returncode for p in procs]
    if NO_GLOO in codes:
        pytest.skip("jax has no gloo CPU collectives (jax_cpu_collectives_implementation)")
    for code, log in zip(codes, logs):
        assert code == 0, f"worker exited with {code}:\n{_tail(log)}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process results, [results of each of the two processes])."""
    pytest.importorskip("jax", reason="multi-process training needs jax")
    pytest.importorskip("tensorflow", reason="the workers feed tf.data")
    tmp = tmp_path_factory.mktemp("multi_process")
    port = _free_port()
    one = str(tmp / "one.npz")
    outs = [str(tmp / f"process{i}.npz") for i in range(PROCESSES)]
    logs = [str(tmp / "one.log")] + [str(tmp / f"process{i}.log") for i in range(PROCESSES)]
    procs = []
    try:
        procs.append(
            _start([WORKER, "--out", one, "--cases", "sam,gsam,late,ramp,adaptive"], logs[0])
        )
        for i, out in enumerate(outs):
            procs.append(
                _start(
                    [
                        WORKER,
                        "--out",
                        out,
                        "--processes",
                        str(PROCESSES),
                        "--process-id",
                        str(i),
                        "--port",
                        str(port),
                        "--cases",
                        "sam,gsam,late,ramp,adaptive,errors",
                    ],
                    logs[i + 1],
                )
            )
    finally:
        _wait_all(procs, logs, TIMEOUT)
    load = lambda path: dict(np.load(path))  # noqa: E731
    return load(one), [load(out) for out in outs]


def _weights(results, case):
    keys = sorted(k for k in results if k.startswith(f"{case}/w"))
    assert keys, f"no weights for {case}"
    return [results[k] for k in keys]


def _check_same_as_one_process(runs, case):
    one, processes = runs
    want = _weights(one, case)
    for results in processes:
        got = _weights(results, case)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
        for g, p0 in zip(got, _weights(processes[0], case)):
            np.testing.assert_array_equal(g, p0)  # one replicated array
        for key in ("batches", "iterations"):
            np.testing.assert_array_equal(
                results[f"{case}/{key}"], one[f"{case}/{key}"], err_msg=key
            )


def test_steps_chosen_on_the_host_alike_in_every_process(runs):
    """sam_every and sam_start_epoch: each process counts steps itself."""
    _check_same_as_one_process(runs, "late")
    one, _ = runs
    np.testing.assert_array_equal(one["late/iterations"], [8, 16, 24])
    # Plain epoch 0; then SAM at steps 9, 12, 15 and 18, 21 (of 8 each).
    for results in [one, *runs[1]]:
        np.testing.assert_allclose(results["late/sam_fraction"], [0, 3 / 8, 2 / 8], rtol=1e-6)


@pytest.mark.parametrize("case", ["sam", "gsam"])
def test_two_processes_train_like_one(runs, case):
    """A plain multi-process fit: the same weights and steps. (Keras' own
    per-process split of a tf.data pipeline has no step count, so the
    progress bar has no target there; the scheduler below states it.)"""
    _check_same_as_one_process(runs, case)
    one, _ = runs
    np.testing.assert_array_equal(one[f"{case}/batches"], [8, 8])
    np.testing.assert_array_equal(one[f"{case}/iterations"], [8, 16])


def test_batch_ramp_with_resume_across_processes(runs):
    _check_same_as_one_process(runs, "ramp")
    one, processes = runs
    for results in [one, *processes]:
        np.testing.assert_array_equal(results["ramp/steps"], RAMP_STEPS)
        np.testing.assert_array_equal(results["ramp/batches"], RAMP_STEPS)
        np.testing.assert_array_equal(results["ramp/params_steps"], RAMP_STEPS)
        np.testing.assert_array_equal(results["ramp/batch_size"], RAMP_SIZES)
        np.testing.assert_array_equal(results["ramp/iterations"], np.cumsum(RAMP_STEPS))
        # interrupted at the start of epoch 2, resumed there
        assert int(results["ramp/interrupted_iterations"]) == sum(RAMP_STEPS[:2])
        np.testing.assert_array_equal(results["ramp/resumed_epochs"], [2, 3])


def test_adaptive_batch_decides_alike_in_every_process(runs):
    """The noise scale is measured on the global batch: every process logs
    the same value (one replicated array) as the one-process run, and so
    takes the same decisions and trains the same weights."""
    _check_same_as_one_process(runs, "adaptive")
    one, processes = runs
    assert len(set(one["adaptive/batch_size"])) >= 2, one["adaptive/batch_size"]
    for results in processes:
        np.testing.assert_array_equal(results["adaptive/batch_size"], one["adaptive/batch_size"])
        np.testing.assert_array_equal(
            results["adaptive/noise_scale"], processes[0]["adaptive/noise_scale"]
        )
        np.testing.assert_allclose(
            results["adaptive/noise_scale"], one["adaptive/noise_scale"], rtol=1e-4
        )


@pytest.mark.parametrize(
    "case, match",
    [
        ("odd_batch", "batch size 5 (epoch 1) is not divisible by the number of devices"),
        ("partial_batch", "drop_remainder=True"),
        (
            "per_process_data",
            "global batch size of 8 at epoch 0, i.e. 4 in each of the 2 processes",
        ),
    ],
)
def test_scheduler_refuses_before_the_first_step(runs, case, match):
    _, processes = runs
    for results in processes:
        message = str(results[f"errors/{case}"])
        assert match in message, message
        assert bool(results[f"errors/{case}_unchanged"])


_MWMS_SCRIPT = r"""
import json, os, sys
os.environ["TF_CONFIG"] = json.dumps({
    "cluster": {"worker": ["127.0.0.1:%d" % int(sys.argv[1])]},
    "task": {"type": "worker", "index": 0},
})
import keras, numpy as np, tensorflow as tf
import keras_sam

strategy = tf.distribute.MultiWorkerMirroredStrategy()
assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
x, y = np.ones((8, 3), "float32"), np.ones((8, 1), "float32")
inner = lambda: keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
results = {}

def attempt(name, model):
    before = [w.copy() for w in model.get_weights()]
    try:
        model.fit(x, y, epochs=1, verbose=0)
        results[name] = "no error"
    except RuntimeError as e:
        results[name] = str(e)
    results[name + "_unchanged"] = all(
        np.array_equal(a, b) for a, b in zip(before, model.get_weights()))

with strategy.scope():   # created in the scope
    model = keras_sam.SAMModel(inner(), rho=0.05)
    model.compile(optimizer="sgd", loss="mse")
attempt("created", model)
model = keras_sam.GSAMModel(inner(), rho=0.05)   # fit in the scope
model.compile(optimizer="sgd", loss="mse")
with strategy.scope():
    attempt("fit", model)
print("RESULTS " + json.dumps(results))
"""


def test_multi_worker_mirrored_strategy_is_a_clear_error():
    pytest.importorskip("tensorflow")
    proc = subprocess.Popen(
        [sys.executable, "-c", _MWMS_SCRIPT, str(_free_port())],
        cwd=ROOT,
        env=_env("tensorflow"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    line = next(row for row in out.splitlines() if row.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS ") :])
    for name, model in (("created", "SAMModel"), ("fit", "GSAMModel")):
        message = results[name]
        assert message.startswith(
            f"{model} cannot train under tf.distribute.MultiWorkerMirroredStrategy"
        ), message
        for needed in (
            "keras-team/keras#20585",
            "KERAS_BACKEND=jax",
            "keras.distribution.initialize",
            "More than one machine",
        ):
            assert needed in message, message
        assert results[name + "_unchanged"]
