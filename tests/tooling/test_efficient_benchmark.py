"""Tests of benchmarks.efficient and of the cheaper-SAM columns of
benchmarks/step_cost.py, end to end on tiny settings."""

import importlib.util
import json
import os
import shutil
import statistics
import sys

import pytest
from paths import ROOT

from benchmarks import efficient
from benchmarks.efficient import cli as efficient_cli
from benchmarks.efficient import grid as efficient_grid
from benchmarks.efficient import methods as efficient_methods
from benchmarks.efficient import stats as efficient_stats
from benchmarks.efficient import training as efficient_training
from benchmarks.paper import run as paper_run

_BENCH = os.path.join(ROOT, "benchmarks")


def _load(name):
    spec = importlib.util.spec_from_file_location(
        f"{name}_benchmark", os.path.join(_BENCH, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


step_cost = _load("step_cost")
update_readme = _load("update_readme")

METHODS = ["sgd", "sam", "sam_every2"]
MODELS = list(efficient_methods.ARCHITECTURES)
SEEDS = [0, 1]
TINY = [
    "--epochs",
    "2",
    "--seeds",
    "0,1",
    "--num-samples",
    "200",
    "--batch",
    "32",
    "--methods",
    ",".join(METHODS),
    "--sharpness-examples",
    "64",
    "--sharpness-iterations",
    "2",
]


def _tables(out):
    """`{section heading: [{column: cell}]}` of results.md's tables."""
    tables, heading = {}, None
    for line in open(os.path.join(out, "results.md")).read().splitlines():
        if line.startswith("## "):
            heading, header = line[3:], None
        elif line.startswith("| ") and heading:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = cells
                tables[heading] = []
            else:
                tables[heading].append(dict(zip(header, cells)))
    return tables


def _runs(out):
    """`{model: {method: {seed: final}}}` read from the stored run files."""
    runs = {}
    for root, _, names in os.walk(os.path.join(out, "runs")):
        for name in names:
            record = paper_run.read_run(os.path.join(root, name))
            runs.setdefault(record["config"]["model"], {}).setdefault(record["method"], {})[
                record["seed"]
            ] = record["final"]
    return runs


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("efficient"))
    assert efficient.main(TINY + ["--out", out]) == {"trained": 12, "skipped": 0}
    return out


def _t_interval(values):
    """Mean and 95% Student-t interval, with the t quantiles of a printed table."""
    t975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764}
    n, mean = len(values), statistics.fmean(values)
    half = t975[n - 1] * statistics.stdev(values) / n**0.5
    return mean, (mean - half, mean + half)


def test_files_and_tables_match_the_stored_runs(tiny_out):
    for name in ("results.md", "runs.md", "summary.json", "sharpness_vs_cost.png"):
        assert os.path.getsize(os.path.join(tiny_out, name)) > 0, name
    for model in MODELS:
        assert sorted(os.listdir(os.path.join(tiny_out, "runs", model))) == sorted(
            f"{m}_C_seed{s}.json.xz" for m in METHODS for s in SEEDS
        )
    assert not [f for root, _, files in os.walk(tiny_out) for f in files if ".tmp" in f]
    text = open(os.path.join(tiny_out, "results.md")).read()
    for word in ("command:", "--epochs 2", "machine:", "keras_sam", "fraction kept", "95%"):
        assert word in text

    tables, runs = _tables(tiny_out), _runs(tiny_out)
    labels = [efficient_methods.METHODS[m] for m in METHODS]
    for model in MODELS:
        table, runs_m = tables[model], runs[model]
        assert [row["method"] for row in table] == labels
        sharp = {
            m: statistics.fmean(f["worst_case_sharpness"] for f in runs_m[m].values())
            for m in METHODS
        }
        for method, row in zip(METHODS, table):
            finals = runs_m[method]
            kept = (sharp["sgd"] - sharp[method]) / (sharp["sgd"] - sharp["sam"])
            assert float(row["fraction kept"]) == pytest.approx(kept, abs=0.0051)
            costs = [
                finals[s]["epoch_ms_per_step"] / runs_m["sgd"][s]["epoch_ms_per_step"]
                for s in SEEDS
            ]
            assert float(row["cost per step / SGD"]) == pytest.approx(
                statistics.median(costs), abs=0.0051
            )
            assert row["cost by seed"] == f"{min(costs):.2f}-{max(costs):.2f}"
            assert float(row["SAM steps"]) == pytest.approx(
                statistics.fmean(f["sam_fraction"] for f in finals.values()), abs=0.0051
            )
            # Paired by seed: the test-error differences to SGD and SAM, intervals.
            for ref in ("sgd", "sam"):
                diff = [
                    100 * (finals[s]["test_error"] - runs_m[ref][s]["test_error"]) for s in SEEDS
                ]
                if len(set(diff)) > 1:
                    mean, (lo, hi) = _t_interval(diff)
                    mean, lo, hi = (round(v, 2) + 0.0 for v in (mean, lo, hi))  # no -0.00
                    assert row[f"vs {ref.upper()}, points [95% CI]"] == (
                        f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]"
                    )
            converged = sum(
                efficient_stats.verdicts.convergence_of(
                    paper_run.read_run(
                        os.path.join(tiny_out, "runs", model, f"{method}_C_seed{s}.json.xz")
                    )["epochs"]
                )["converged"]
                for s in SEEDS
            )
            assert row["converged"] == f"{converged}/2"
        assert table[0]["fraction kept"] == "0.00" and table[1]["fraction kept"] == "1.00"
        assert table[0]["verdict"] == table[1]["verdict"] == "—"
        # 160 training examples / batch 32: 5 steps per epoch, steps 0..9 in all;
        # SAM on 0, 2, 4 (3 of epoch 1's 5) and 6, 8 (2 of epoch 2's 5).
        assert float(table[2]["SAM steps"]) == pytest.approx((3 / 5 + 2 / 5) / 2, abs=0.0051)
    verdict_table = {row["method"]: row for row in tables["Verdicts"]}
    assert list(verdict_table) == ["SAM every 2"]
    words = [tables[m][2]["verdict"].split(" (")[0] for m in MODELS]
    assert [verdict_table["SAM every 2"][m] for m in MODELS] == words
    assert verdict_table["SAM every 2"]["both"] == f"**{efficient_stats.overall(words)}**"
    runs_md = open(os.path.join(tiny_out, "runs.md")).read()
    assert runs_md.count("| mnist1d_") == len(MODELS) * len(METHODS) * len(SEEDS)


def test_fraction_kept_interval_and_verdict_rules():
    assert efficient_stats.fraction_kept(0.04, 0.03, 0.031) == pytest.approx(0.9)
    assert efficient_stats.fraction_kept(0.04, 0.04, 0.03) is None
    values = [0.95, 0.91, 1.02, 0.97, 0.93]
    mean, (lo, hi) = efficient_stats.mean_ci(values)
    ref_mean, (ref_lo, ref_hi) = _t_interval(values)
    assert (mean, lo, hi) == pytest.approx((ref_mean, ref_lo, ref_hi), abs=1e-4)
    assert efficient_stats.mean_ci([0.5]) == (0.5, None)
    assert efficient_stats.mean_ci([]) == (None, None)

    def verdict(cost, kept, error_sgd=(-0.01, 0.005), error_sam=(-0.01, 0.005), **kw):
        return efficient_stats.verdict(cost, kept, error_sgd, error_sam, **kw)[0]

    above = (0.001, 0.02)
    assert verdict(1.2, (0.92, 1.1)) == "yes"
    assert efficient_stats.verdict(1.26, (0.92, 1.1), above, above) == ("no", "cost 1.26x > 1.25x")
    assert verdict(1.2, (0.5, 0.85)) == "no"
    # Costs accuracy only when the test error is above both SGD's and SAM's.
    assert verdict(1.2, (0.92, 1.1), above, above) == "no"
    assert verdict(1.2, (0.92, 1.1), above) == "yes"
    assert verdict(1.2, (0.92, 1.1), error_sam=above) == "yes"
    assert verdict(1.2, (0.8, 1.1)) == "not settled"
    assert verdict(1.2, (0.92, 1.1), all_converged=False) == "not settled"
    assert verdict(1.2, None, None, None) == "not settled"
    assert verdict(None, (0.92, 1.1)) == "not settled"
    assert efficient_stats.overall(["yes", "yes"]) == "yes"
    assert efficient_stats.overall(["yes", "not settled"]) == "not settled"
    assert efficient_stats.overall(["yes", "no"]) == "no"
    assert efficient_stats.overall([]) == "not settled"


def test_rerun_skips_and_a_failed_run_keeps_the_stored_ones(tiny_out, tmp_path, monkeypatch):
    assert efficient.main(TINY + ["--out", tiny_out]) == {"trained": 0, "skipped": 12}
    out = str(tmp_path / "copy")
    shutil.copytree(tiny_out, out)
    os.remove(os.path.join(out, "runs", "mnist1d_mlp", "sam_every2_C_seed1.json.xz"))

    def stored():
        return {
            os.path.join(root, n): open(os.path.join(root, n), "rb").read()
            for root, _, names in os.walk(os.path.join(out, "runs"))
            for n in names
        }

    good = stored()

    def crash(args, data, method, seed):
        raise KeyboardInterrupt(f"simulated failure in {method} seed {seed}")

    monkeypatch.setattr(efficient_grid, "train_one", crash)
    with pytest.raises(KeyboardInterrupt):
        efficient.main(TINY + ["--out", out])
    assert stored() == good
    tables = _tables(out)
    assert [row["runs"] for row in tables["mnist1d_mlp"]] == ["2", "2", "1"]
    # One seed left: no interval, so not settled, unless the cost alone says no.
    row = json.load(open(os.path.join(out, "summary.json")))["tables"]["mnist1d_mlp"][2]
    expected = (
        f"no (cost {row['cost']:.2f}x > 1.25x)"
        if row["cost"] > 1.25
        else "not settled (fewer than 2 seeds)"
    )
    assert tables["mnist1d_mlp"][2]["verdict"] == expected


def test_bad_arguments_are_refused_before_training(capsys):
    for argv, word in (
        (["--models", "resnet"], "model"),
        (["--methods", "adam"], "method"),
        (["--extend-until-converged", "-1"], "fraction"),
    ):
        with pytest.raises(SystemExit):
            efficient_cli.parse_args(argv)
        assert word in capsys.readouterr().err


def test_step_cost_reports_the_cheaper_schedules(tmp_path, monkeypatch):
    path = str(tmp_path / "step_cost_cpu.json")
    result = step_cost.main(
        [
            "--batch",
            "4",
            "--image",
            "8",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--batches",
            "2",
            "--methods",
            "sam_every5,looksam5,aesam",
            "--json",
            path,
        ]
    )
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
    tiny = [a if a != "0,1" else "0" for a in tiny] + ["--models", "mnist1d_cnn"]
    assert efficient.main(tiny + ["--out", out]) == {"trained": 4, "skipped": 0}
    runs = _runs(out)["mnist1d_cnn"]
    for m in ("sgdm", "msam", "mesa"):
        assert runs[m][0]["sam_fraction"] == 0.0  # one gradient per step
    assert runs["looksam5_alpha0.3"][0]["sam_fraction"] == pytest.approx(1 / 5)
    # Momentum methods: SGD momentum 0.9 at a tenth of the paper's rate.
    for method in ("sgdm", "msam"):
        optimizer = efficient_methods.optimizer_of(method)(0.1)
        assert optimizer.momentum == 0.9
        assert float(keras.ops.convert_to_numpy(optimizer.learning_rate)) == pytest.approx(0.01)
        schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
        scaled = efficient_methods.optimizer_of(method)(schedule)._learning_rate
        for step in (0, 7, 30):
            assert float(scaled(step)) == pytest.approx(0.1 * float(schedule(step)))
    assert efficient_methods.optimizer_of("sam") is paper_run.plain_sgd


def test_step_cost_fit_calls_in_fresh_processes(tmp_path, monkeypatch):
    path = str(tmp_path / "fit_calls.json")
    result = step_cost.main(
        [
            "--fit-calls",
            "--processes",
            "2",
            "--calls",
            "2",
            "--fit-steps",
            "5",
            "--batch",
            "4",
            "--image",
            "8",
            "--methods",
            "sam_every5,msam",
            "--json",
            path,
        ]
    )
    assert json.load(open(path)) == result
    assert len(result["seconds_per_call"]) == 2  # one record per process
    for process in result["seconds_per_call"]:
        assert sorted(process["times"]) == ["msam", "plain", "sam_every5"]
        assert all(len(v) == 2 for v in process["times"].values())
        for name, tails in process["tails"].items():
            assert all(0 <= t <= c for t, c in zip(tails, process["times"][name]))
    for name in ("sam_every5", "msam"):
        r = result["ratio"][name]
        ratios = [
            p["times"][name][i] / p["times"]["plain"][i]
            for p in result["seconds_per_call"]
            for i in range(2)
        ]
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


def test_readme_blocks_read_the_summary(tiny_out, tmp_path, monkeypatch):
    os.makedirs(tmp_path / "efficient")
    shutil.copy(os.path.join(tiny_out, "summary.json"), tmp_path / "efficient")
    monkeypatch.setattr(update_readme, "RESULTS", str(tmp_path))
    summary = json.load(open(os.path.join(tiny_out, "summary.json")))
    block = update_readme.efficient()
    assert summary["verdict_table"] in block and summary["command"] in block
    for model in MODELS:
        assert f"{model}:\n\n{summary['markdown'][model]}" in block
    front = update_readme.efficient_verdicts()
    assert front.startswith(summary["verdict_table"])
    assert f"{summary['runs']} runs, {summary['converged']} converged" in front


def test_late_phase_sam_with_the_batch_ramp(tmp_path):
    """SAM for the last half of the epochs, with the ramp: plain epochs
    first, the share of SAM steps weighted by each epoch's steps."""
    out = str(tmp_path / "late")
    tiny = [a if a != ",".join(METHODS) else "sgd,sam,late50" for a in TINY]
    tiny = [a if a != "0,1" else "0" for a in tiny] + ["--models", "mnist1d_cnn"]
    tiny = [a if a != "2" else "5" for a in tiny]  # 5 epochs: one per stage
    tiny += ["--schedule", "BC", "--initial-batch", "4", "--extend-until-converged", "0"]
    assert efficient.main(tiny + ["--out", out]) == {"trained": 3, "skipped": 0}
    assert (
        efficient_methods.sam_start_epoch(0.5, 4) == 2
        and efficient_methods.sam_start_epoch(0.1, 5) == 4
    )
    record = paper_run.read_run(os.path.join(out, "runs", "mnist1d_cnn", "late50_BC_seed0.json.xz"))
    epochs = record["epochs"]
    assert [e["sam_fraction"] for e in epochs] == [0.0, 0.0, 0.0, 1.0, 1.0]
    steps = [e["steps"] for e in epochs]
    assert len(set(steps)) > 1  # the ramp: fewer steps as the batch grows
    assert record["final"]["sam_fraction"] == pytest.approx(sum(steps[3:]) / sum(steps))
    assert "BC (batch 4->64 doubling" in open(os.path.join(out, "results.md")).read()


def test_cost_weights_each_phase_median_by_its_steps():
    timer = efficient_training.StepTimer()
    # Two phases: plain epochs of 10 steps at 1 ms, SAM epochs of 5 at 2 ms;
    # the first epoch of each phase traces (slow) and is left out.
    spans = [0.1, 0.010, 0.010, 0.5, 0.010, 0.010]
    steps = [10, 10, 10, 5, 5, 5]
    timer.spans = spans
    timer.epochs = [[0.0] * n for n in steps]
    phases = [("b", False)] * 3 + [("b", True)] * 3
    expected = (30 * 1.0 + 15 * 2.0) / 45
    assert timer.epoch_ms_per_step(phases) == pytest.approx(expected)
    # One phase: the median over the epochs after the first.
    assert timer.epoch_ms_per_step() == pytest.approx(
        1e3 * statistics.median(s / n for s, n in zip(spans[1:], steps[1:]))
    )
