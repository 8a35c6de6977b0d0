"""JAX under `keras.distribution.DataParallel` (two forced host devices): the
default per-device perturbation equals `num_batch_splits=<devices>` on one
device, and `sync_perturbation=True` equals the one-device global step.
The checks run in a subprocess (tests/support/jax_per_device_check.py): the device
count is fixed when JAX starts."""

import importlib.util

import pytest
from forced_devices import with_two_host_devices
from other_backends import last_json_line
from other_backends import subprocess_env


@pytest.fixture(scope="module")
def differences():
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    return last_json_line("jax_per_device_check.py", with_two_host_devices(subprocess_env("jax")))


@pytest.mark.parametrize("kind", ["sam", "gsam"])
def test_per_device_perturbation_equals_one_sub_batch_per_device(differences, kind):
    assert differences[f"{kind}_per_device_vs_splits"] <= 1e-6
    assert differences[f"{kind}_logs_vs_splits"] <= 1e-6  # loss, mae, sharpness, grad_norm


@pytest.mark.parametrize("kind", ["sam", "gsam"])
def test_sync_perturbation_keeps_the_global_step(differences, kind):
    assert differences[f"{kind}_sync_vs_one_device"] <= 1e-6
    # ...and the two modes really differ (rho is large enough to tell).
    assert differences[f"{kind}_per_device_vs_one_device"] > 1e-3


def test_looksam_runs_per_device_and_differs_from_sync(differences):
    assert differences["looksam_per_device_vs_sync"] > 1e-3


def test_split_check_uses_each_devices_shard(differences):
    assert "does not divide the per-replica batch size 6" in differences["split_check"]
