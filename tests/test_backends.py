"""keras_sam on the TensorFlow, JAX and PyTorch backends, jit on and off.

Each backend runs tests/backend_check.py in its own process (Keras fixes its
backend per process); JAX also with `keras.distribution.DataParallel` over two
forced host devices. Every run must match the float64 least-squares oracle,
and all runs must agree with the TensorFlow run to float32 rounding.
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from forced_devices import with_two_host_devices

HERE = os.path.dirname(__file__)
N = 32  # examples in tests/backend_check.py
# (backend, jit, data parallel over 2 forced host devices)
RUNS = [
    ("tensorflow", False, False),
    ("tensorflow", True, False),
    ("jax", False, False),
    ("jax", True, False),
    ("jax", True, True),
    ("torch", False, False),
    ("torch", True, False),  # torch.compile: the linear oracles and GSAM only
]


def _installed(backend):
    return importlib.util.find_spec(backend) is not None


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("backends")
    results = {}
    for backend, jit, parallel in RUNS:
        if not _installed(backend):
            continue
        out = folder / f"{backend}_{jit}_{parallel}.npz"
        env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="")
        cmd = [sys.executable, os.path.join(HERE, "backend_check.py"), str(out)]
        if jit:
            cmd.append("--jit")
        if backend == "torch" and jit:
            cmd.append("--core-only")
        if parallel:
            cmd.append("--data-parallel")
            env = with_two_host_devices(env)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{backend} jit={jit}:\n{proc.stderr[-4000:]}"
        results[(backend, jit, parallel)] = dict(np.load(out))
    return results


@pytest.mark.parametrize(
    "backend, jit, parallel",
    RUNS,
    ids=[f"{b}-jit{j}" + ("-dataparallel" if p else "") for b, j, p in RUNS],
)
def test_backend_matches_oracles_and_tensorflow(outputs, backend, jit, parallel):
    if not _installed(backend):
        pytest.skip(f"{backend} is not installed")
    got = outputs[(backend, jit, parallel)]
    core_only = "scheduler_steps" not in got
    # torch.compile (core only): RWP and Flat-LoRA are left out for time.
    oracles = ("linear_sam", "linear_gsam") + (() if core_only else ("rwp", "flat_lora"))
    for name in oracles:
        np.testing.assert_allclose(
            got[name], got[name + "_oracle"], rtol=1e-5, atol=1e-6, err_msg=name
        )
    # Late-phase SAM: plain Keras first, then SAM, exactly (weights,
    # BatchNorm statistics, optimizer step count and momentum).
    np.testing.assert_array_equal(got["late_phase"], got["late_phase_reference"])
    if not core_only:
        assert not got["flat_lora_frozen_changed"]  # LoRA's frozen kernel: bitwise equal
    np.testing.assert_array_equal(got["late_phase_sam_fraction"], [0, 0, 1, 1])
    norms = got["late_phase_grad_norm"]
    assert np.isnan(norms[:2]).all() and np.isfinite(norms[2:]).all(), norms
    reference = outputs[("tensorflow", False, False)]
    if not core_only:
        for name in ("full_gradient_norm", "hessian_max_eigenvalue"):
            np.testing.assert_allclose(got[name], got[name + "_oracle"], rtol=1e-4, err_msg=name)
        np.testing.assert_array_equal(got["scheduler_steps"], [8, 4, 2])
        np.testing.assert_array_equal(got["scheduler_batch_sizes"], [4, 8, 16])
        assert int(got["scheduler_iterations"]) == 14
        np.testing.assert_array_equal(got["plateau_batch_sizes"], got["plateau_expected"])
        np.testing.assert_array_equal(got["plateau_steps"], N // got["plateau_batch_sizes"])
        assert len(set(got["plateau_batch_sizes"])) >= 2  # it grew
        np.testing.assert_allclose(
            got["worst_case_sharpness"], reference["worst_case_sharpness"], rtol=1e-4
        )
    # torch.compile: GSAM, AE-SAM for the conditional second pass and the
    # wrapper's own state, MESA for the teacher pass and its average.
    names = (
        ["mlp_gsam", "mlp_aesam", "cls_mesa", "mlp_late"]
        if core_only
        else [
            "mlp_sam",
            "mlp_asam",
            "mlp_gsam",
            "mlp_split",
            "mlp_every",
            "mlp_looksam",
            "mlp_aesam",
            "mlp_msam",
            "cls_mesa",
            "mlp_every_host",
            "mlp_looksam_host",
            "mlp_late",
        ]
    )
    if "mlp_every" in names:  # chosen on the host == chosen in the step
        for name in ("mlp_every", "mlp_looksam"):
            np.testing.assert_allclose(
                got[name + "_host"], got[name], rtol=1e-5, atol=1e-6, err_msg=name
            )
    for name in names:
        np.testing.assert_allclose(
            got[name],
            reference[name],
            rtol=1e-5,
            atol=1e-6,
            err_msg=f"{name} on {backend} jit={jit}",
        )
        np.testing.assert_allclose(
            got[name + "_logs"],
            reference[name + "_logs"],
            rtol=1e-5,
            atol=1e-6,
            err_msg=f"{name} logs",
        )
