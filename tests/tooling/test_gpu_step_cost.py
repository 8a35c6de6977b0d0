"""benchmarks/gpu_step_cost.py: the cost ratios against each method's own
baseline, and the script's CPU smoke run with every option (JAX, subprocess)."""

import importlib.util
import json
import os
import subprocess
import sys

import keras
import pytest
from other_backends import subprocess_env
from paths import ROOT


def test_each_ratio_is_the_median_per_round_ratio_to_its_own_baseline(monkeypatch):
    # The script defaults KERAS_BACKEND to jax for the processes it would start.
    monkeypatch.setenv("KERAS_BACKEND", keras.backend.backend())
    from benchmarks import gpu_step_cost as script

    times = {
        "plain": [100.0, 90.0, 110.0],
        "sam": [50.0, 50.0, 50.0],
        "plain_momentum": [80.0, 80.0, 80.0],
        "msam": [40.0, 80.0, 20.0],
        "minimal_plain": [60.0, 60.0, 60.0],
        "minimal_sam": [30.0, 20.0, 60.0],
    }
    ratios = script.cost_ratios(times)
    assert set(ratios) == {"sam", "msam", "minimal_sam"}
    assert ratios["sam"] == pytest.approx(2.0)  # median of 2.0, 1.8, 2.2
    assert ratios["msam"] == pytest.approx(2.0)  # of 80/40, 80/80, 80/20: not plain SGD's
    assert ratios["minimal_sam"] == pytest.approx(2.0)  # of 2, 3, 1


def test_small_run_times_every_method_with_its_optimizer(tmp_path):
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    out = tmp_path / "gpu.json"
    env = subprocess_env("jax")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_step_cost.py")]
    cmd += ["--small", "--cheaper", "--conditional", "--minimal", "--policies", "float32"]
    proc = subprocess.run(
        cmd + ["--json", str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    policy = json.loads(out.read_text())["policies"]["float32"]
    timed = {"plain", "sam", "gsam", "sam_every5", "looksam5", "plain_momentum", "msam", "mesa"}
    timed |= {"conditional", "minimal_plain", "minimal_sam"}
    assert set(policy["images_per_second"]) == timed
    assert set(policy["cost_ratio"]) == timed - {"plain", "plain_momentum", "minimal_plain"}
    assert all(v > 0 for v in policy["images_per_second"].values())

    # A second policy merged into the same file keeps the first.
    cmd += ["--policies", "mixed_bfloat16", "--merge"]
    proc = subprocess.run(
        cmd + ["--json", str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    both = json.loads(out.read_text())["policies"]
    assert both["float32"] == policy and set(both) == {"float32", "mixed_bfloat16"}


def test_merge_refuses_results_of_another_setting(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", keras.backend.backend())
    from benchmarks import gpu_step_cost as script

    stored = dict(device="H200", keras="3.15.1", jax="0.11.2", batch=256, image=32)
    stored["policies"] = {"float32": {"x": 1}}
    new = dict(stored, policies={"mixed_bfloat16": {"x": 2}})
    assert script.merged(stored, new)["policies"] == {
        "float32": {"x": 1},
        "mixed_bfloat16": {"x": 2},
    }
    with pytest.raises(SystemExit, match="batch=256 \\(now 128\\)"):
        script.merged(stored, dict(new, batch=128))
