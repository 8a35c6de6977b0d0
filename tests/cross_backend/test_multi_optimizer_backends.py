"""Reruns tests/integration/test_multi_optimizer.py on JAX and PyTorch: rho = 0 equals
plain Keras with the same MultiOptimizer, SAM and GSAM steps equal
hand-written ones, every wrapper routes each variable to its optimizer or
refuses before the first step."""

import os

import pytest
from other_backends import run_module_on

from keras_sam import _keras_compat

if _keras_compat.keras_version() < (3, 15):
    pytest.skip("keras.optimizers.MultiOptimizer is new in Keras 3.15", allow_module_level=True)

MODULE = os.path.join("tests", "integration", "test_multi_optimizer.py")
TIMEOUT_S = 600


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_multi_optimizer_on_backend(backend):
    run_module_on(backend, MODULE, TIMEOUT_S)
