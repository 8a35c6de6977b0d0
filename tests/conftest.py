"""Test setup: four logical CPU devices so MirroredStrategy tests run on one CPU.

TensorFlow fixes its device list the first time it initializes, so this must run
before anything touches a device.
"""

import os
import shutil
import tempfile

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
# JAX's persistent compilation cache, for every JAX process the tests start
# (the backend and noise-scale checks, the reruns of whole modules): XLA
# compiles most of their time away, and many of their computations are the
# same (small models, the same ops). One folder per test session, made by
# the process that starts the session and handed to the xdist workers and
# their subprocesses through the environment; CI sets
# JAX_COMPILATION_CACHE_DIR itself, to share it between its two Keras legs.
# The rerun of test_model_families.py on JAX, alone with 2 xdist workers on
# the 2-core machine: 269 s without the cache, 168 s with it, 297 s with a
# size limit (JAX then locks the folder and scans every entry at each
# write), so there is none. Without the lock, a read that meets an entry
# still being written fails to decompress, and JAX warns and compiles
# (jax._src.compiler._cache_read).

JAX_CACHE_SETTINGS = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
_OWN_JAX_CACHE = pytest.StashKey[str]()  # the folder this process made


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # the controller's settings, inherited
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        folder = tempfile.mkdtemp(prefix="keras_sam_jax_cache.")
        config.stash[_OWN_JAX_CACHE] = folder
        os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    for name, value in JAX_CACHE_SETTINGS.items():
        os.environ.setdefault(name, value)


def pytest_unconfigure(config):
    folder = config.stash.get(_OWN_JAX_CACHE, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)


# ---------------------------------------------------------------------------
# tests/support/noise_scale_check.py on every backend, once per session (used by
# test_noise_scale.py and test_adaptive_batch_size.py).

NOISE_SCALE_RUNS = [("tensorflow", False), ("jax", False), ("jax", True), ("torch", False)]
"""(backend, DataParallel over two forced host devices)"""


def _noise_scale_check(backend, parallel):
    """`make(out)` for tests/support/session_files.py: tests/support/noise_scale_check.py in a
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
    """`{(backend, parallel): results}` of tests/support/noise_scale_check.py for the
    installed backends, made once per session: with pytest-xdist, the workers
    that ask at once share the runs out between them (tests/support/session_files.py)."""
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
# The folders of tests/, by kind; a module's folder gives its mark:
#
# - unit/: the math and the checks of arguments, no training;
# - integration/: the library's features in `fit` on this process's backend;
# - backends/: each backend's check (tests/support/backend_check.py in a
#   process per backend);
# - cross_backend/ (mark `cross_backend`): whole features rerun in
#   subprocesses on the other backends, over several processes or on forced
#   device meshes;
# - tooling/ (mark `tooling`): the benchmark scripts, the docs, the examples;
# - support/: helpers, the scripts tests run in subprocesses, saved files.
#
# CI's oldest-Keras leg runs `-m "not tooling and not cross_backend"`; the
# newest-Keras leg runs everything.

KINDS = ("unit", "integration", "backends", "cross_backend", "tooling")
MARKED_KINDS = ("cross_backend", "tooling")


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
        kind = item.path.parent.name
        if kind not in KINDS:
            raise pytest.UsageError(
                f"{item.path}: a test module belongs in one of tests/{{{','.join(KINDS)}}}"
            )
        if kind in MARKED_KINDS:
            item.add_marker(getattr(pytest.mark, kind))
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
