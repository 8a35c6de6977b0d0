"""Test setup: four logical CPU devices so MirroredStrategy tests run on one CPU.

TensorFlow fixes its device list the first time it initializes, so this must run
before anything touches a device.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
from forced_devices import with_two_host_devices  # noqa: E402

NUM_LOGICAL_CPUS = 4

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS
    )


# ---------------------------------------------------------------------------
# tests/noise_scale_check.py on every backend, once per session (used by
# test_noise_scale.py and test_adaptive_batch_size.py).

NOISE_SCALE_RUNS = [("tensorflow", False), ("jax", False), ("jax", True), ("torch", False)]
"""(backend, DataParallel over two forced host devices)"""


def _run_noise_scale_check(backend, parallel, folder):
    import json
    import subprocess
    import sys

    here = os.path.dirname(__file__)
    out = os.path.join(folder, f"{backend}_{parallel}.json")
    root = os.path.dirname(here)  # this checkout's keras_sam, not an installed one
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="", PYTHONPATH=path)
    cmd = [sys.executable, os.path.join(here, "noise_scale_check.py"), out]
    if parallel:
        cmd.append("--data-parallel")
        env = with_two_host_devices(env)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{backend}:\n{proc.stderr[-4000:]}"
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def noise_scale_backends(tmp_path_factory):
    """`{(backend, parallel): results}` of tests/noise_scale_check.py for the
    installed backends."""
    import importlib.util

    folder = str(tmp_path_factory.mktemp("noise_scale"))
    return {
        (backend, parallel): _run_noise_scale_check(backend, parallel, folder)
        for backend, parallel in NOISE_SCALE_RUNS
        if importlib.util.find_spec(backend) is not None
    }


# ---------------------------------------------------------------------------
# Marks for CI's oldest-Keras leg, which runs `-m "not tooling and not
# cross_backend"`: the library's own tests, each backend's check
# (test_backends.py, test_backends_torch.py) and the noise scale on every
# backend, but not the tests of the benchmark scripts, the docs and the
# examples (`tooling`), nor the modules that rerun whole features in
# subprocesses on the other backends, over several processes or on forced
# device meshes (`cross_backend`). The newest-Keras leg runs everything.

TOOLING_MODULES = frozenset(
    {
        "test_docs.py",
        "test_examples.py",
        "test_examples_fine_tune.py",
        "test_paper_benchmark.py",
        "test_paper_verdicts.py",
        "test_efficient_benchmark.py",
        "test_step_memory.py",
        "test_gpu_step_cost.py",
        "test_lora_study.py",
    }
)
CROSS_BACKEND_MODULES = frozenset(
    {
        "test_model_families_backends.py",
        "test_fine_tuning_backends.py",
        "test_multi_process.py",
        "test_model_parallel.py",
        "test_jax_per_device.py",
    }
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in TOOLING_MODULES:
            item.add_marker(pytest.mark.tooling)
        if item.path.name in CROSS_BACKEND_MODULES:
            item.add_marker(pytest.mark.cross_backend)
