"""Reruns tests/test_model_families.py on every installed Keras backend.

Keras fixes its backend per process, so each backend other than the one this
pytest process runs gets a subprocess with KERAS_BACKEND set; the module
itself runs in this process on the current backend.
"""

import importlib.util
import os
import subprocess
import sys
import time

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = os.path.join("tests", "test_model_families.py")
TIMEOUT_S = 900  # JAX took 366 s with other tests running beside it


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_model_families_on_backend(backend):
    if backend == keras.backend.backend():
        pytest.skip(f"{MODULE} runs in this process on {backend}")
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", MODULE]
    start = time.time()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        pytest.fail(f"{MODULE} on {backend} ran past {TIMEOUT_S} s:\n{out[-6000:]}")
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, (
        f"{MODULE} failed on KERAS_BACKEND={backend} "
        f"(rc={proc.returncode}, {time.time() - start:.0f} s):\n{tail}"
    )
