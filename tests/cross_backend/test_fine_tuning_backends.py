"""Reruns the KerasHub fine-tuning checks of tests/integration/test_fine_tuning.py on
JAX and PyTorch (each step against the hand-written step, frozen weights
bitwise, generate / predict / reload after training, the LoRA share).
MirroredStrategy and the JAX memory check run from the TensorFlow process
only; JAX ModelParallel: tests/cross_backend/test_model_parallel.py."""

import os

import pytest
from other_backends import run_module_on

from keras_sam import _keras_compat

if _keras_compat.keras_version() < (3, 15):
    pytest.skip("keras-hub 0.32 needs Keras >= 3.15", allow_module_level=True)
pytest.importorskip("keras_hub", reason="keras-hub is an extra: pip install keras_sam[hub]")

MODULE = os.path.join("tests", "integration", "test_fine_tuning.py")
SELECT = "hand_written or generates or small_share"
TIMEOUT_S = 900  # JAX took 95 s alone on the 2-core machine


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_fine_tuning_on_backend(backend):
    run_module_on(backend, MODULE, TIMEOUT_S, SELECT)
