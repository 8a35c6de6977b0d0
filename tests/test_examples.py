"""Smoke tests of the examples and the batch-switch benchmark, as subprocesses."""

import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=120):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _snapshot(folder):
    """The benchmark's own result files in `folder`, with their mtimes."""
    if not os.path.isdir(folder):
        return {}
    return {
        f: os.stat(os.path.join(folder, f)).st_mtime_ns
        for f in os.listdir(folder)
        if f.startswith("batch_switch.")
    }


def test_increasing_batch_example():
    out = _run("examples/increasing_batch.py", "--epochs", "5", "--num-samples", "600")
    for name in ("constant", "+B", "+C"):
        assert re.search(rf"^\s*{re.escape(name)}\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+$", out, re.M), out
    match = re.search(r"^batch sizes per epoch \(\+B\): (\[.*\])$", out, re.M)
    assert match, out
    assert ast.literal_eval(match.group(1)) == [16, 32, 64, 128, 256]


def test_batch_switch_benchmark(tmp_path):
    results = os.path.join(ROOT, "benchmarks", "results")
    before = _snapshot(results)
    out = _run(
        "benchmarks/batch_switch.py",
        "--b1",
        "8",
        "--b2",
        "16",
        "--steps",
        "4",
        "--warmup",
        "1",
        "--reps",
        "1",
        "--image",
        "8",
        "--out",
        str(tmp_path),
    )
    assert re.search(r"^throughput ratio switch/fresh: [0-9.]+ ", out, re.M), out
    assert re.search(r"^switch cost: -?[0-9.]+ extra steps", out, re.M), out
    assert sorted(os.listdir(tmp_path)) == ["batch_switch.json", "batch_switch.md"]
    assert _snapshot(results) == before


def test_quickstart_example():
    out = _run("examples/quickstart.py", "--epochs", "1")
    assert "test accuracy" in out
    for name in ("sgd", "sam", "gsam"):
        assert re.search(rf"^\s*{name}: [0-9.]+$", out, re.M), out
