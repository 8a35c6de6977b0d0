"""Reruns tests/integration/test_custom_method.py on JAX and PyTorch: the guide's worked
example equals its NumPy replay on every backend."""

import os

import pytest
from other_backends import run_module_on

MODULE = os.path.join("tests", "integration", "test_custom_method.py")
TIMEOUT_S = 300


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_custom_method_on_backend(backend):
    run_module_on(backend, MODULE, TIMEOUT_S)
