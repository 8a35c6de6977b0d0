"""Reruns the Dense-stack checks of tests/integration/test_lora_resume.py on JAX and
PyTorch: a LoRA fine-tune resumed by BackupAndRestore, or continued after
ModelCheckpoint and load_model, ends where the uninterrupted run ends, for
SAM, GSAM, Flat-LoRA and RWP with SGD and AdamW."""

import os

import pytest
from other_backends import run_module_on

MODULE = os.path.join("tests", "integration", "test_lora_resume.py")
SELECT = "dense or saved_by_0_4 or plain_keras or other_lora"
TIMEOUT_S = 600


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_lora_resume_on_backend(backend):
    run_module_on(backend, MODULE, TIMEOUT_S, SELECT)
