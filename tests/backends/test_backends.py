"""keras_sam on the TensorFlow and JAX backends, jit on and off
(test_backends_torch.py: PyTorch).

Each backend runs tests/support/backend_check.py in its own process (Keras fixes its
backend per process); JAX also with `keras.distribution.DataParallel` over two
forced host devices. Every run must match the float64 least-squares oracle,
and all runs must agree with the TensorFlow run to float32 rounding
(tests/support/backend_runs.py).
"""

import pytest
from backend_runs import REFERENCE
from backend_runs import check_run
from backend_runs import installed
from backend_runs import run
from session_files import shared_folder

# (backend, jit, data parallel over 2 forced host devices)
RUNS = [
    ("tensorflow", False, False),
    ("tensorflow", True, False),
    ("jax", False, False),
    ("jax", True, False),
    ("jax", True, True),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return shared_folder(tmp_path_factory, "backend_runs")


@pytest.mark.parametrize(
    "backend, jit, parallel",
    RUNS,
    ids=[f"{b}-jit{j}" + ("-dataparallel" if p else "") for b, j, p in RUNS],
)
def test_backend_matches_oracles_and_tensorflow(folder, backend, jit, parallel):
    if not installed(backend):
        pytest.skip(f"{backend} is not installed")
    check_run(run(folder, backend, jit, parallel), run(folder, *REFERENCE), backend, jit)
