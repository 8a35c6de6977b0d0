"""Tests of benchmarks.efficient and of the cheaper-SAM columns of
benchmarks/step_cost.py, end to end on tiny settings."""

import importlib.util
import json
import os
import shutil
import statistics
import sys

import pytest

from benchmarks import efficient

_BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark",
                                                  os.path.join(_BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


step_cost = _load("step_cost")
update_readme = _load("update_readme")

METHODS = ["sgd", "sam", "sam_every2"]
TINY = ["--epochs", "1", "--seeds", "0", "--num-samples", "200", "--batch", "32",
        "--methods", ",".join(METHODS), "--sharpness-examples", "64",
        "--sharpness-iterations", "2"]


def _table(out):
    """The results table as a list of {column: cell} dicts."""
    lines = [line for line in open(os.path.join(out, "results.md")).read().splitlines()
             if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            for line in lines[1:]]


def _runs(out):
    runs = {}
    for name in os.listdir(os.path.join(out, "runs")):
        with open(os.path.join(out, "runs", name)) as f:
            record = json.load(f)
        runs.setdefault(record["method"], []).append(record["final"])
    return runs


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("efficient"))
    assert efficient.main(TINY + ["--out", out]) == {"trained": 3, "skipped": 0}
    return out


def test_files_and_table_match_the_stored_runs(tiny_out):
    for name in ("results.md", "summary.json", "sharpness_vs_cost.png"):
        assert os.path.getsize(os.path.join(tiny_out, name)) > 0, name
    assert sorted(os.listdir(os.path.join(tiny_out, "runs"))) == sorted(
        f"{m}_C_seed0.json" for m in METHODS)
    assert not [f for root, _, files in os.walk(tiny_out) for f in files if ".tmp" in f]
    text = open(os.path.join(tiny_out, "results.md")).read()
    for word in ("command:", "--epochs 1", "machine:", "keras_sam", "fraction kept"):
        assert word in text

    table, runs = _table(tiny_out), _runs(tiny_out)
    labels = [efficient.METHODS[m] for m in METHODS]
    assert [row["method"] for row in table] == labels
    sharp = {m: statistics.fmean(f["worst_case_sharpness"] for f in runs[m]) for m in METHODS}
    ms = {m: statistics.median(f["ms_per_step"] for f in runs[m]) for m in METHODS}
    for method, row in zip(METHODS, table):
        kept = (sharp["sgd"] - sharp[method]) / (sharp["sgd"] - sharp["sam"])
        assert float(row["fraction kept"]) == pytest.approx(kept, abs=0.0051)
        assert float(row["cost per step / SGD"]) == pytest.approx(
            ms[method] / ms["sgd"], abs=0.0051)
        assert float(row["SAM steps"]) == pytest.approx(
            statistics.fmean(f["sam_fraction"] for f in runs[method]), abs=0.0051)
    assert table[0]["fraction kept"] == "0.00" and table[1]["fraction kept"] == "1.00"
    # 160 training examples / batch 32: steps 0..4, SAM on 0, 2, 4.
    assert float(table[2]["SAM steps"]) == pytest.approx(3 / 5, abs=0.0051)


def test_rerun_skips_and_a_failed_run_keeps_the_stored_ones(tiny_out, tmp_path, monkeypatch):
    assert efficient.main(TINY + ["--out", tiny_out]) == {"trained": 0, "skipped": 3}
    out = str(tmp_path / "copy")
    shutil.copytree(tiny_out, out)
    os.remove(os.path.join(out, "runs", "sam_every2_C_seed0.json"))
    good = {n: open(os.path.join(out, "runs", n)).read()
            for n in os.listdir(os.path.join(out, "runs"))}

    def crash(args, data, method, seed):
        raise KeyboardInterrupt(f"simulated failure in {method} seed {seed}")

    monkeypatch.setattr(efficient, "train_one", crash)
    with pytest.raises(KeyboardInterrupt):
        efficient.main(TINY + ["--out", out])
    assert {n: open(os.path.join(out, "runs", n)).read()
            for n in os.listdir(os.path.join(out, "runs"))} == good
    assert [row["method"] for row in _table(out)] == ["SGD", "SAM"]


def test_step_cost_reports_the_cheaper_schedules(tmp_path, monkeypatch):
    path = str(tmp_path / "step_cost_cpu.json")
    result = step_cost.main(["--batch", "4", "--image", "8", "--rounds", "1",
                             "--warmup", "0", "--batches", "2",
                             "--methods", "sam_every5,looksam5,aesam", "--json", path])
    new = ["sam_every5", "looksam5", "aesam"]
    assert list(result["ms_per_step"]) == ["plain"] + new
    assert set(result["ratio"]) == set(new)
    assert all(result["ratio"][k] > 0 for k in new)
    # One timed call of 5 steps: exactly one SAM step for sam_every=5 and LookSAM.
    assert result["sam_fraction"]["sam_every5"] == pytest.approx(0.2)
    assert result["sam_fraction"]["looksam5"] == pytest.approx(0.2)
    assert 0 <= result["sam_fraction"]["aesam"] <= 1
    assert json.load(open(path)) == result

    monkeypatch.setattr(update_readme, "RESULTS", str(tmp_path))
    block = update_readme.step_cost_cpu()
    header = block.splitlines()[0]
    for label in ("plain", "SAM every 5", "LookSAM every 5", "AE-SAM"):
        assert f"| {label} |" in header
    assert "share of SAM steps" in block


def test_one_gradient_methods_and_the_looksam_alphas_run_with_their_optimizers(tmp_path):
    import keras

    methods = ["sgdm", "msam", "mesa", "looksam5_alpha0.3"]
    out = str(tmp_path / "one_gradient")
    tiny = [a if a != ",".join(METHODS) else ",".join(methods) for a in TINY]
    assert efficient.main(tiny + ["--out", out]) == {"trained": 4, "skipped": 0}
    runs = _runs(out)
    for m in ("sgdm", "msam", "mesa"):
        assert runs[m][0]["sam_fraction"] == 0.0  # one gradient per step
    assert runs["looksam5_alpha0.3"][0]["sam_fraction"] == pytest.approx(1 / 5)
    # Momentum methods: SGD momentum 0.9 at a tenth of the paper's rate.
    for method in ("sgdm", "msam"):
        optimizer = efficient.optimizer_of(method)(0.1)
        assert optimizer.momentum == 0.9
        assert float(keras.ops.convert_to_numpy(optimizer.learning_rate)) == pytest.approx(0.01)
        schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
        scaled = efficient.optimizer_of(method)(schedule)._learning_rate
        for step in (0, 7, 30):
            assert float(scaled(step)) == pytest.approx(0.1 * float(schedule(step)))
    assert efficient.optimizer_of("sam") is efficient.paper_run.plain_sgd


def test_step_cost_fit_calls_in_fresh_processes(tmp_path, monkeypatch):
    path = str(tmp_path / "fit_calls.json")
    result = step_cost.main(["--fit-calls", "--processes", "2", "--calls", "2",
                             "--fit-steps", "5", "--batch", "4", "--image", "8",
                             "--methods", "sam_every5,msam", "--json", path])
    assert json.load(open(path)) == result
    assert len(result["seconds_per_call"]) == 2  # one record per process
    for process in result["seconds_per_call"]:
        assert sorted(process["times"]) == ["msam", "plain", "sam_every5"]
        assert all(len(v) == 2 for v in process["times"].values())
        for name, tails in process["tails"].items():
            assert all(0 <= t <= c for t, c in zip(tails, process["times"][name]))
    for name in ("sam_every5", "msam"):
        r = result["ratio"][name]
        ratios = [p["times"][name][i] / p["times"]["plain"][i]
                  for p in result["seconds_per_call"] for i in range(2)]
        assert r["calls_min"] == pytest.approx(min(ratios))
        assert r["calls_max"] == pytest.approx(max(ratios))
        assert r["calls"] == 4 and 0 <= r["calls_with_slow_teardown"] <= 4
        assert len(r["process_medians"]) == 2

    # The README block renders from both modes' files.
    folder = tmp_path / "results"
    folder.mkdir()
    for _, name in update_readme.FIT_CALLS:
        shutil.copy(path, folder / name)
    monkeypatch.setattr(update_readme, "RESULTS", str(folder))
    block = update_readme.step_cost_fit_calls()
    for mode, _ in update_readme.FIT_CALLS:
        assert f"| {mode} | SAM every 5 | {result['ratio']['sam_every5']['median']:.2f} |" in block


def test_step_cost_needs_whole_periods():
    with pytest.raises(SystemExit):
        step_cost.main(["--steps", "3"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
