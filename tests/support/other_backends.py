"""Reruns a test module under another Keras backend, in a subprocess (Keras
fixes its backend per process); shared by the `*_backends.py` test modules."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import keras
import pytest
from paths import ROOT
from paths import SUPPORT


def subprocess_env(backend):
    """`os.environ` for a test's subprocess on Keras backend `backend`: no GPU,
    and this checkout's keras_sam first on PYTHONPATH, before the caller's
    path (where CI's oldest-Keras leg puts Keras 3.12), so the subprocess
    tests this checkout whatever keras_sam is installed."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="", PYTHONPATH=path)


def run_script(script, args, env, timeout_s=600):
    """Runs tests/support/`script` with `args` and `env`; returns its standard output,
    or fails with its stderr's tail if it exits with an error."""
    proc = subprocess.run(
        [sys.executable, os.path.join(SUPPORT, script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, f"{script} {' '.join(args)}:\n{proc.stderr[-4000:]}"
    return proc.stdout


def last_json_line(script, env, timeout_s=600):
    """The JSON of the last line tests/support/`script` printed (`run_script`)."""
    return json.loads(run_script(script, [], env, timeout_s).strip().splitlines()[-1])


def run_module_on(backend, module, timeout_s, select=None):
    """Runs `module` (a path from the repository root) with pytest under
    KERAS_BACKEND=`backend`; `select` is pytest's `-k` expression. Skips on
    the backend this process runs (the module runs here already) and on a
    backend that is not installed; fails with the output's tail otherwise."""
    if backend == keras.backend.backend():
        pytest.skip(f"{module} runs in this process on {backend}")
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    env = subprocess_env(backend)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", module]
    if select:
        cmd += ["-k", select]
    start = time.time()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        pytest.fail(f"{module} on {backend} ran past {timeout_s} s:\n{out[-6000:]}")
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, (
        f"{module} failed on KERAS_BACKEND={backend} "
        f"(rc={proc.returncode}, {time.time() - start:.0f} s):\n{tail}"
    )
