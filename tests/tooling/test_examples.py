"""The examples and the benchmark scripts as a user runs them, as
subprocesses: their output, and nothing on stderr (no TensorFlow C++
start-up line, no warning) for `--help` and a short run."""

import ast
import math
import os
import re
import subprocess
import sys

import pytest
from paths import ROOT


def _run(*args, timeout=120, progress=None):
    """Runs `python *args` in the repository root as a user would (no
    TF_CPP_MIN_LOG_LEVEL of ours); its stdout, once it exited 0 and wrote
    nothing to stderr but, where `progress` (a regex) is given, its own
    progress lines."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
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
    other = [
        line for line in proc.stderr.splitlines() if not (progress and re.fullmatch(progress, line))
    ]
    assert not other, f"python {' '.join(args)} wrote to stderr:\n{proc.stderr[-3000:]}"
    return proc.stdout


SCRIPTS = sorted(
    [f"examples/{f}" for f in os.listdir(os.path.join(ROOT, "examples")) if f[0] != "_"]
    + [
        f"benchmarks/{f}"
        for f in os.listdir(os.path.join(ROOT, "benchmarks"))
        if f.endswith(".py") and f[0] != "_" and f != "architectures.py"
    ]
    + ["benchmarks/efficient"]
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_writes_nothing_to_stderr(script):
    if script == "benchmarks/efficient":  # a package
        out = _run("-m", "benchmarks.efficient", "--help", timeout=240)
    else:
        out = _run(script, "--help", timeout=240)
    assert "usage:" in out


def test_the_paper_benchmark_help_writes_nothing_to_stderr():
    assert "usage:" in _run("-m", "benchmarks.paper", "--help", timeout=240)


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
    # 640: full batches only (a short last batch retraces the measures'
    # functions, which TensorFlow warns about)
    out = _run("examples/increasing_batch.py", "--epochs", "5", "--num-samples", "640")
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
        progress=r"(rep \d+/\d+ .* trace\(s\) at B2|wrote .*batch_switch\.md and \.json)",
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


def test_importing_the_library_sets_no_environment_variable():
    """Quieting TensorFlow is the scripts' business (examples/_quiet.py): the
    library leaves the environment as it found it."""
    code = (
        "import os, keras, tensorflow; before = dict(os.environ); "
        "import keras_sam; print(dict(os.environ) == before)"
    )
    out = _run("-c", code, timeout=240, progress=r".*")  # TensorFlow's own lines allowed here
    assert out.strip().splitlines()[-1] == "True"


def test_layerwise_sam_example_prints_each_epoch():
    out = _run("examples/layerwise_sam.py", "--epochs", "2")
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 0", "epoch 1"]
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in lines]
    assert all(math.isfinite(v) for v in losses), out
