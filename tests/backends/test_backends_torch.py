"""keras_sam on the PyTorch backend, eager and under torch.compile (the
checks of test_backends.py, in a module of their own so that pytest-xdist
runs them beside the TensorFlow and JAX runs; tests/support/backend_runs.py)."""

import pytest
from backend_runs import REFERENCE
from backend_runs import check_run
from backend_runs import run
from session_files import shared_folder

pytest.importorskip("torch", reason="the PyTorch backend needs torch")

# (backend, jit, data parallel); torch.compile runs the linear oracles, GSAM,
# AE-SAM, MESA and late-phase SAM only (`--core-only`), for time.
RUNS = [("torch", False, False), ("torch", True, False)]


@pytest.mark.parametrize("backend, jit, parallel", RUNS, ids=["torch-jitFalse", "torch-jitTrue"])
def test_backend_matches_oracles_and_tensorflow(tmp_path_factory, backend, jit, parallel):
    folder = shared_folder(tmp_path_factory, "backend_runs")
    check_run(run(folder, backend, jit, parallel), run(folder, *REFERENCE), backend, jit)
