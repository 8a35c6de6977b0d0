"""Reruns tests/integration/test_model_families.py on every installed Keras backend.

Keras fixes its backend per process, so each backend other than the one this
pytest process runs gets a subprocess with KERAS_BACKEND set; the module
itself runs in this process on the current backend.
"""

import os

import pytest
from other_backends import run_module_on

MODULE = os.path.join("tests", "integration", "test_model_families.py")
TIMEOUT_S = 900  # JAX took 366 s with other tests running beside it


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_model_families_on_backend(backend):
    run_module_on(backend, MODULE, TIMEOUT_S)
