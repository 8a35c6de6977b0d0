"""The memory of each compiled training step, from XLA's accounting (JAX).

Runs `benchmarks/step_memory.py` on the small MLP in a JAX process and checks
what the cheaper steps promise: a step between SAM steps, and a plain step
before `sam_start_epoch`, hold no more temporary memory than plain Keras; a
SAM step of `sam_every=5` no more than `SAMModel`'s; SAM at most about one
parameter-sized buffer more than plain Keras and GSAM about two, so a change
that keeps a third copy alive fails here.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from other_backends import subprocess_env
from paths import ROOT

TOLERANCE = 0.02
"""Relative slack on "no more than" (XLA's buffer assignment may round)."""


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    out = tmp_path_factory.mktemp("memory") / "memory.json"
    env = subprocess_env("jax")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "step_memory.py")]
    proc = subprocess.run(
        cmd + ["--sizes", "small", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        result = json.load(f)
    return {(r["method"], r["kind"]): r for r in result["sizes"]["small"]["rows"]}


def temp(rows, method, kind="the step"):
    return rows[(method, kind)]["temp"]


def test_steps_chosen_on_the_host_cost_their_own_memory(rows):
    plain, sam = temp(rows, "plain"), temp(rows, "sam")
    assert temp(rows, "sam_every5", "step between") <= plain * (1 + TOLERANCE)
    assert temp(rows, "sam_every5", "SAM step") <= sam * (1 + TOLERANCE)
    # Keras' own step (the wrapper's metrics add a few bytes).
    assert temp(rows, "late", "plain step (before the start epoch)") <= plain * (1 + TOLERANCE)
    assert temp(rows, "late", "SAM step") <= sam * (1 + TOLERANCE)
    for (method, kind), r in rows.items():
        chooses_inside = kind.startswith("choosing inside") or method == "aesam"
        assert r["conditional"] == chooses_inside, (method, kind)


def test_sam_holds_one_parameter_copy_and_gsam_two(rows):
    parameters = rows[("plain", "the step")]["parameters"]
    plain = temp(rows, "plain")
    assert temp(rows, "sam") - plain <= 1.1 * parameters
    assert temp(rows, "gsam") - plain <= 2.1 * parameters
    # LookSAM's reuse step: one direction-sized temporary, and the stored one.
    assert temp(rows, "looksam5", "step between") - plain <= 1.1 * parameters
    looksam = rows[("looksam5", "SAM step")]
    assert looksam["stored"] >= parameters  # the direction g_v
