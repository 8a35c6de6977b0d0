"""Test setup: four logical CPU devices so MirroredStrategy tests run on one CPU.

TensorFlow fixes its device list the first time it initializes, so this must run
before anything touches a device.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
from forced_devices import with_two_host_devices  # noqa: E402
from other_backends import run_script  # noqa: E402
from other_backends import subprocess_env  # noqa: E402
from session_files import made_once_each  # noqa: E402
from session_files import shared_folder  # noqa: E402

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


def _noise_scale_check(backend, parallel):
    """`make(out)` for tests/session_files.py: tests/noise_scale_check.py in a
    process of its own under KERAS_BACKEND=`backend`, its results in `out`."""

    def make(out):
        env = subprocess_env(backend)
        args = [str(out)]
        if parallel:
            args.append("--data-parallel")
            env = with_two_host_devices(env)
        run_script("noise_scale_check.py", args, env)

    return make


@pytest.fixture(scope="session")
def noise_scale_backends(tmp_path_factory):
    """`{(backend, parallel): results}` of tests/noise_scale_check.py for the
    installed backends, made once per session: with pytest-xdist, the workers
    that ask at once share the runs out between them (tests/session_files.py)."""
    import importlib.util
    import json

    folder = shared_folder(tmp_path_factory, "noise_scale")
    paths = {
        (backend, parallel): folder / f"{backend}_{parallel}.json"
        for backend, parallel in NOISE_SCALE_RUNS
        if importlib.util.find_spec(backend) is not None
    }
    made_once_each([(path, _noise_scale_check(*key)) for key, path in paths.items()])
    return {key: json.loads(path.read_text()) for key, path in paths.items()}


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
        "test_lora_resume_backends.py",
        "test_multi_optimizer_backends.py",
        "test_custom_method_backends.py",
    }
)


# ---------------------------------------------------------------------------
# The order pytest-xdist hands modules out in. CI runs `-n auto --dist
# loadfile --no-loadscope-reorder`: each module goes whole to one worker, in
# the order below, the longest first, so no long module starts last while
# the other worker sits idle (xdist's own order, by number of tests, left
# the two-test modules that start 4-6 min runs in a subprocess to the end).
# Seconds of work per module, newest-Keras leg, on the 2-core CI machine
# (`--durations=0`); the modules not named take under 50 s each and follow
# in file order.

SLOWEST_FIRST = (
    "test_model_families_backends.py",  # 381
    "test_backends_torch.py",  # 290
    "test_backends.py",  # 250
    "test_paper_benchmark.py",  # 221
    "test_model_families.py",  # 173
    "test_efficient_benchmark.py",  # 147
    "test_fine_tuning_backends.py",  # 136
    "test_examples_fine_tune.py",  # 115
    "test_fine_tuning.py",  # 110, with the LoRA example's runs
    "test_lora_resume.py",  # about 95 (measured alone, 2 cores)
    "test_examples.py",  # about 90: --help of every script
    "test_lora_resume_backends.py",  # about 75
    "test_multi_optimizer_backends.py",  # about 50
    "test_custom_method_backends.py",  # about 40
    "test_noise_scale.py",  # 98, with the noise-scale runs
    "test_host_steps.py",  # 71
    "test_gpu_step_cost.py",  # 70
    "test_model_parallel.py",  # 70
    "test_efficient.py",  # 63
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in TOOLING_MODULES:
            item.add_marker(pytest.mark.tooling)
        if item.path.name in CROSS_BACKEND_MODULES:
            item.add_marker(pytest.mark.cross_backend)
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
