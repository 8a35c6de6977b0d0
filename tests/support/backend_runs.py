"""The runs of tests/support/backend_check.py, one process per (backend, jit, data
parallel), shared by test_backends.py (TensorFlow, JAX) and
test_backends_torch.py (PyTorch), so that pytest-xdist gives the two sets
of runs to two workers; both compare with the TensorFlow run without jit,
which is made once per test session and read by the other module
(tests/support/session_files.py).
"""

import importlib.util

import numpy as np
from forced_devices import with_two_host_devices
from other_backends import run_script
from other_backends import subprocess_env
from session_files import made_once

N = 32  # examples in tests/support/backend_check.py
REFERENCE = ("tensorflow", False, False)
"""(backend, jit, data parallel over 2 forced host devices) that every run
is compared with."""


def installed(backend):
    return importlib.util.find_spec(backend) is not None


def run(folder, backend, jit, parallel):
    """The arrays tests/support/backend_check.py saved for this setting, made in a
    process of its own the first time any module of the session asks."""

    def make(part):
        env = subprocess_env(backend)
        args = [str(part)]
        if jit:
            args.append("--jit")
        if backend == "torch" and jit:
            args.append("--core-only")
        if parallel:
            args.append("--data-parallel")
            env = with_two_host_devices(env)
        run_script("backend_check.py", args, env)

    return dict(np.load(made_once(folder / f"{backend}_{jit}_{parallel}.npz", make)))


def check_run(got, reference, backend, jit):
    """One run against the float64 oracles, its own invariants and the
    TensorFlow run."""
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
