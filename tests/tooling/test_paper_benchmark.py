"""Tests of benchmarks.paper: the paper's grid, end to end on tiny data."""

import json
import math
import os
import shutil

import keras
import numpy as np
import pytest

from benchmarks.paper import cli as paper
from benchmarks.paper import data as paper_data
from benchmarks.paper import report as paper_report
from benchmarks.paper import run as paper_run

TINY_ROWS = [("sgd", "B"), ("sgd", "BC"), ("sam", "B"), ("sam", "BC")]


def _table_rows(out):
    with open(os.path.join(out, "results.md")) as f:
        text = f.read().split("## The paper's claims")[0]  # the main table
    rows = [
        line
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| method")
    ]
    return rows


def _runs(out):
    """The whole stored run records of a model folder, by (method, schedule, seed)."""
    return {
        (r["method"], r["schedule"], r["seed"]): r
        for r in paper_run.stored_runs(os.path.join(out, "runs"))
    }


def _row_keys(rows):
    return [tuple(c.strip() for c in row.strip("|").split("|")[:2]) for row in rows]


MODEL = "mnist1d_cnn"  # --tiny's model: the grid's folder has one subfolder per model


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tiny"))
    stats = paper.main(["--tiny", "--out", out])
    assert stats == {"trained": 4, "skipped": 0}
    return out


@pytest.fixture(scope="module")
def tiny_out(tiny_root):
    return os.path.join(tiny_root, MODEL)


def test_tiny_grid_files_and_table(tiny_root, tiny_out):
    for name in (
        "results.md",
        "runs.md",
        "runs.json",
        "train_loss.png",
        "test_error.png",
        "sharpness.png",
        "grad_norm.png",
        "batch_size.png",
        "learning_rate.png",
        "verdicts.png",
    ):
        assert os.path.getsize(os.path.join(tiny_out, name)) > 0, name
    for name in ("summary.md", "summary.json"):
        assert os.path.getsize(os.path.join(tiny_root, name)) > 0, name
    for method, schedule in TINY_ROWS:
        assert os.path.exists(os.path.join(tiny_out, "runs", f"{method}_{schedule}_seed0.json.xz"))
    rows = _table_rows(tiny_out)
    assert _row_keys(rows) == TINY_ROWS
    text = open(os.path.join(tiny_out, "results.md")).read()
    for word in (
        "command:",
        "--tiny",
        "date:",
        "machine:",
        "python",
        "keras",
        "tensorflow",
        "keras_sam",
    ):
        assert word in text
    # No temporary files left behind.
    assert not [f for f in os.listdir(tiny_out) if ".tmp" in f]


def test_tiny_grid_records_follow_the_schedules(tiny_out):
    with open(os.path.join(tiny_out, "runs.json")) as f:
        summary = json.load(f)
    assert [(r["method"], r["schedule"]) for r in summary["runs"]] == TINY_ROWS
    assert all("epochs" not in r and r["epochs_trained"] == 5 for r in summary["runs"])
    whole = _runs(tiny_out)
    runs = [whole[(r["method"], r["schedule"], r["seed"])] for r in summary["runs"]]
    num_train = 400  # 80% of --tiny's 500 samples
    epochs = 5
    expected_batches = [16, 32, 64, 128, 256]  # one epoch per doubling stage
    expected_steps = [num_train // b for b in expected_batches]
    for run in runs:
        records = run["epochs"]
        assert len(records) == epochs
        assert [e["batch_size"] for e in records] == expected_batches
        assert run["steps_per_epoch"] == expected_steps
        assert [e["steps"] for e in records] == expected_steps
        assert [e["iterations"] for e in records] == list(np.cumsum(expected_steps))
        for e, rec in enumerate(records):
            if run["schedule"] == "B":
                expected_lr = 0.1
            else:  # cosine 0.1 -> 0.001, read after epoch e: progress (e+1)/5
                p = (e + 1) / epochs
                expected_lr = 0.001 + (0.1 - 0.001) * (1 + math.cos(math.pi * p)) / 2
            assert rec["learning_rate"] == pytest.approx(expected_lr, rel=1e-4, abs=1e-7)
            assert math.isfinite(rec["train_loss"])
            assert 0.0 <= rec["test_error"] <= 1.0
        final = run["final"]
        assert final["worst_case_sharpness"] >= 0
        assert final["full_gradient_norm"] > 0
        assert final["train_time_s"] > 0
        assert records[-1]["worst_case_sharpness"] == final["worst_case_sharpness"]


def test_rerun_skips_finished_runs(tiny_root, tiny_out, capsys):
    before = open(os.path.join(tiny_out, "results.md")).read()
    stats = paper.main(["--tiny", "--out", tiny_root])
    assert stats == {"trained": 0, "skipped": 4}
    assert "skipped" in capsys.readouterr().err
    # Nothing trained: the report keeps the header (date, wall time) of the
    # invocation that trained the runs.
    assert open(os.path.join(tiny_out, "results.md")).read() == before
    assert "it trained 4 of them" in before


def test_interrupted_run_resumes(tiny_root, tmp_path, monkeypatch):
    root = str(tmp_path / "resume")
    shutil.copytree(tiny_root, root)
    out = os.path.join(root, MODEL)
    victim = os.path.join(out, "runs", "sam_B_seed0.json.xz")
    os.remove(victim)
    good = {
        n: open(os.path.join(out, "runs", n), "rb").read()
        for n in os.listdir(os.path.join(out, "runs"))
    }

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt("simulated interruption")

    train_one = paper_run.train_one

    def crashing_train_one(args, data, method, schedule, seed, **kwargs):
        if (method, schedule, seed) == ("sam", "B", 0):
            kwargs["callbacks"] = [*kwargs.get("callbacks", ()), Crash()]
        return train_one(args, data, method, schedule, seed, **kwargs)

    monkeypatch.setattr(paper_run, "train_one", crashing_train_one)
    with pytest.raises(KeyboardInterrupt):
        paper.main(["--tiny", "--out", root])
    assert not os.path.exists(victim)
    for n, text in good.items():  # finished runs untouched
        assert open(os.path.join(out, "runs", n), "rb").read() == text
    rows = _table_rows(out)  # the table shows the completed runs only
    assert _row_keys(rows) == TINY_ROWS
    assert [r.split("|")[3].strip() for r in rows] == ["1", "1", "0", "1"]
    assert not [f for f in os.listdir(out) if ".tmp" in f]

    monkeypatch.setattr(paper_run, "train_one", train_one)
    stats = paper.main(["--tiny", "--out", root])
    assert stats == {"trained": 1, "skipped": 3}
    assert os.path.exists(victim)
    rows = _table_rows(out)
    assert _row_keys(rows) == TINY_ROWS
    assert [r.split("|")[3].strip() for r in rows] == ["1", "1", "1", "1"]


def test_report_is_rebuilt_from_the_stored_runs(tiny_out, tmp_path):
    out = str(tmp_path / "rebuild" / MODEL)
    shutil.copytree(tiny_out, out)
    expected = open(os.path.join(out, "results.md")).read()
    derived = [f for f in os.listdir(out) if f != "runs" and f != "runs.json"]
    for name in derived:
        os.remove(os.path.join(out, name))
    assert paper_report.main(["--out", out]) == 4
    # runs.json of the same runs: the header (command, date, ...) is kept.
    assert open(os.path.join(out, "results.md")).read() == expected
    assert sorted(os.listdir(out)) == sorted(derived + ["runs", "runs.json"])

    # From the run files alone: the same table, and a command that reruns them.
    os.remove(os.path.join(out, "runs.json"))
    os.remove(os.path.join(out, "results.md"))
    assert paper_report.main(["--out", out]) == 4
    assert _table_rows(out) == _table_rows(tiny_out)
    text = open(os.path.join(out, "results.md")).read()
    assert "python -m benchmarks.paper --dataset mnist1d --model mnist1d_cnn" in text
    assert f"--out {os.path.dirname(out)}" in text  # the grid folder
    assert "rebuilt from the stored runs" in text
    # The grid folder's summary is rebuilt beside the model folder.
    assert os.path.exists(os.path.join(os.path.dirname(out), "summary.md"))
    with open(os.path.join(out, "runs.json")) as f:
        assert [r["name"] for r in json.load(f)["runs"]] == [f"{m}_{s}_seed0" for m, s in TINY_ROWS]
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_report_without_runs_is_refused(tmp_path):
    with pytest.raises(SystemExit) as err:
        paper_report.main(["--out", str(tmp_path)])
    assert "no stored runs" in str(err.value)


def test_failed_write_keeps_the_stored_file(tmp_path, monkeypatch):
    path = str(tmp_path / "run.json")
    paper_run.write_atomic(path, "good")

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        paper_run.store_run(path, {"final": {}})
    assert open(path).read() == "good"
    assert os.listdir(tmp_path) == ["run.json"]


def test_sharpness_every_measures_during_training(tmp_path):
    out = str(tmp_path / "every")
    stats = paper.main(
        ["--tiny", "--methods", "sam", "--schedules", "B", "--sharpness-every", "2", "--out", out]
    )
    out = os.path.join(out, MODEL)
    assert stats == {"trained": 1, "skipped": 0}
    run = paper_run.read_run(os.path.join(out, "runs", "sam_B_seed0.json.xz"))
    keys = ("worst_case_sharpness", "full_gradient_norm")
    epochs = run["epochs"]
    for e in (1, 3):  # epochs 2 and 4: measured during training
        assert all(epochs[e][k] > 0 for k in keys) and epochs[e]["measure_s"] > 0
    for e in (0, 2):
        assert not any(k in epochs[e] for k in keys + ("measure_s",))
    # The last epoch is measured once, after fit.
    assert [epochs[-1][k] for k in keys] == [run["final"][k] for k in keys]
    assert "measure_s" not in epochs[-1]


def test_stored_run_of_another_config_is_refused(tiny_root, tmp_path, capsys):
    out = str(tmp_path / "other")
    shutil.copytree(tiny_root, out)
    with pytest.raises(SystemExit) as err:
        paper.main(["--tiny", "--out", out, "--num-samples", "600"])
    assert "another configuration" in str(err.value)


# ---------------------------------------------------------------------------
# CIFAR path with mocked tensorflow_datasets.


def test_cifar_pipeline_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    import tensorflow as tf

    paper_data._DATA_CACHE.clear()
    with tfds.testing.mock_data(num_examples=40):
        data = paper_data.Data("cifar10", None, 0)
    paper_data._DATA_CACHE.clear()
    assert data.x.shape == (40, 32, 32, 3) and data.x.dtype == np.uint8
    assert data.input_shape == (32, 32, 3) and data.classes == 10
    # Per-channel normalization: mean 0, std 1 per channel on the train set.
    x = data.eval_arrays(data.x)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1.0, atol=1e-3)
    assert data.mean.shape == (3,) and data.std.shape == (3,)
    # Batches drop the remainder and keep 32x32x3.
    ds = data.train_dataset(16, seed=0)
    batches = list(ds)
    assert len(batches) == 2 == int(ds.cardinality())
    for xb, yb in batches:
        assert tuple(xb.shape) == (16, 32, 32, 3) and xb.dtype == tf.float32
        assert tuple(yb.shape) == (16,)
    # Augmentation: crop from the 4-pixel zero padding + flip keeps the shape
    # and only moves pixels (each output pixel is an input pixel or padding).
    tf.random.set_seed(1)
    img = tf.constant(np.arange(32 * 32 * 3, dtype=np.int32).reshape(32, 32, 3) % 251 + 1, tf.uint8)
    seen_shift = False
    for _ in range(10):
        out = data.augment(img).numpy()
        assert out.shape == (32, 32, 3)
        values = set(np.unique(out)) - {0}
        assert values <= set(np.unique(img.numpy()))
        seen_shift |= not np.array_equal(out, img.numpy())
    assert seen_shift


def test_cifar_tiny_run_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    paper_data._DATA_CACHE.clear()
    out = str(tmp_path / "cifar")
    with tfds.testing.mock_data(num_examples=64):
        stats = paper.main(
            [
                "--dataset",
                "cifar10",
                "--model",
                "tiny_cnn2d",
                "--methods",
                "gsam",
                "--schedules",
                "B",
                "--seeds",
                "0",
                "--epochs",
                "5",
                "--initial-batch",
                "2",
                "--sharpness-examples",
                "16",
                "--sharpness-iterations",
                "2",
                "--jobs",
                "0",
                "--out",
                out,
            ]
        )
    paper_data._DATA_CACHE.clear()
    assert stats == {"trained": 1, "skipped": 0}
    out = os.path.join(out, "tiny_cnn2d")
    (run,) = _runs(out).values()
    assert [e["batch_size"] for e in run["epochs"]] == [2, 4, 8, 16, 32]
    assert [e["steps"] for e in run["epochs"]] == [32, 16, 8, 4, 2]
    assert len(run["normalization"]["mean"]) == 3
    assert _row_keys(_table_rows(out)) == [("gsam", "B")]


# ---------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--dataset", "imagenet"], ["cifar10", "cifar100", "mnist1d"]),
        (["--model", "vgg16"], ["resnet18", "wrn28_10", "mnist1d_cnn", "mnist1d_mlp"]),
        (["--methods", "sgd,adam"], ["adam", "sgd, sam, gsam"]),
        (["--schedules", "cosine"], ["cosine", "constant, B, C, BC, linear, constant_steps"]),
        (["--epochs", "12"], ["multiple of 5", "12"]),
        (["--epochs", "0"], ["positive int"]),
        (["--seeds", "a,b"], ["--seeds"]),
        (["--dataset", "mnist1d", "--model", "resnet18"], ["mnist1d_cnn, mnist1d_mlp"]),
        (["--dataset", "cifar10", "--model", "mnist1d_mlp"], ["resnet18", "tiny_cnn2d"]),
        (["--epochs", "12", "--schedules", "constant_steps"], ["multiple of 5"]),
        (["--jobs", "-1"], ["--jobs", ">= 0"]),
        (["--jobs", "0", "--threads", "2"], ["--threads", "--jobs 0"]),
        (["--steps-per-execution", "0"], ["positive int"]),
    ],
)
def test_bad_input_names_allowed_values(argv, words, capsys):
    with pytest.raises(SystemExit) as err:
        paper.parse_args(argv)
    assert err.value.code == 2
    msg = capsys.readouterr().err
    for word in words:
        assert word in msg, (word, msg)


def test_epochs_not_multiple_of_5_ok_without_increasing_batch():
    args = paper.parse_args(["--epochs", "12", "--schedules", "constant,C,linear"])
    assert args.epochs == 12


def test_grid_that_does_not_fit_memory_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(paper_data, "available_memory_bytes", lambda: 10_000)
    with pytest.raises(SystemExit) as err:
        paper.main(["--tiny", "--out", str(tmp_path)])
    msg = str(err.value)
    assert "does not fit in memory" in msg and "MemAvailable" in msg
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# Speed: worker processes and steps per execution leave the results as they are.


def _finals(root, model=MODEL):
    runs = _runs(os.path.join(root, model)).values()
    return {
        r["name"]: (
            r["final"]["test_error"],
            r["final"]["train_loss"],
            r["final"]["worst_case_sharpness"],
            r["final"]["full_gradient_norm"],
            [e["train_loss"] for e in r["epochs"]],
        )
        for r in runs
    }


def test_runs_side_by_side_equal_runs_one_at_a_time(tmp_path, capsys):
    """--jobs 2 and --jobs 1 with the same --threads: bitwise equal runs
    (each run seeds itself; the worker that trains it does not matter)."""
    common = ["--tiny", "--threads", "1", "--schedules", "B,constant"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert paper.main([*common, "--jobs", "1", "--out", one])["trained"] == 4
    assert "1 at a time (1 thread(s) each)" in capsys.readouterr().err
    assert paper.main([*common, "--jobs", "2", "--out", two])["trained"] == 4
    assert "2 at a time (1 thread(s) each)" in capsys.readouterr().err
    assert _finals(one) == _finals(two)
    run = paper_run.read_run(os.path.join(two, MODEL, "runs", "sam_B_seed0.json.xz"))
    assert run["intra_op_threads"] == 1
    # The comparison report says so, with the wall-time ratio of the two.
    from benchmarks.paper import compare as paper_compare

    text = paper_compare.compare(os.path.join(one, MODEL), os.path.join(two, MODEL))
    assert "steps): 4 of 4." in text
    walls = [json.load(open(os.path.join(d, MODEL, "runs.json")))["wall_s"] for d in (one, two)]
    assert f"**{walls[0] / walls[1]:.2f}x**" in text
    assert "--out" not in text.split("\n")[2]  # the command without its folder


def test_compare_refuses_grids_of_another_configuration(tiny_out, tmp_path):
    from benchmarks.paper import compare as paper_compare

    other = str(tmp_path / MODEL)
    shutil.copytree(tiny_out, other)
    path = os.path.join(other, "runs.json")
    stored = json.load(open(path))
    stored["config"]["epochs"] = 10
    json.dump(stored, open(path, "w"))
    with pytest.raises(SystemExit, match="epochs"):
        paper_compare.compare(tiny_out, other)


def test_steps_per_execution_does_not_change_the_results(tmp_path):
    common = ["--tiny", "--methods", "gsam", "--schedules", "BC,linear"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    paper.main([*common, "--steps-per-execution", "1", "--out", a])
    paper.main([*common, "--steps-per-execution", "7", "--out", b])
    assert _finals(a) == _finals(b)


def test_steps_matched_control_takes_as_many_steps_as_B(tmp_path):
    out = str(tmp_path / "control")
    stats = paper.main(
        ["--tiny", "--methods", "sgd", "--schedules", "B,constant,constant_steps", "--out", out]
    )
    assert stats["trained"] == 3
    runs = {r["schedule"]: r for r in _runs(os.path.join(out, MODEL)).values()}
    # 400 examples: B takes 25 + 12 + 6 + 3 + 1 = 47 steps over 5 epochs; the
    # control 400 // 128 = 3 steps per epoch for ceil(47 / 3) = 16 epochs.
    assert sum(runs["B"]["steps_per_epoch"]) == 47
    assert runs["constant_steps"]["steps_per_epoch"] == [3] * 16
    assert [e["steps"] for e in runs["constant_steps"]["epochs"]] == [3] * 16
    assert [e["batch_size"] for e in runs["constant_steps"]["epochs"]] == [128] * 16
    assert runs["constant_steps"]["epochs"][-1]["iterations"] == 48
    assert runs["constant"]["steps_per_epoch"] == [3] * 5
    # Examples seen: the constant run is the examples-matched control.
    assert runs["B"]["examples"] == 25 * 16 + 12 * 32 + 6 * 64 + 3 * 128 + 1 * 256
    assert runs["constant"]["examples"] == 5 * 3 * 128
    assert runs["constant_steps"]["examples"] == 48 * 128
    text = open(os.path.join(out, MODEL, "results.md")).read()
    assert "as many steps as B (16 epochs" in text
    assert "+B is flatter than constant with as many steps (control)" in text


def test_report_verdicts_are_computed_from_the_runs(tiny_out):
    from benchmarks.paper import verdicts as paper_verdicts

    with open(os.path.join(tiny_out, "runs.json")) as f:
        stored = json.load(f)
    assert stored["verdicts"] == json.loads(json.dumps(paper_verdicts.verdicts(stored["runs"])))
    text = open(os.path.join(tiny_out, "results.md")).read()
    for v in stored["verdicts"]:
        assert f"| **{v['claim']}** |" in text and f"**{v['verdict']}** |" in text
    runs_md = open(os.path.join(tiny_out, "runs.md")).read()
    for r in _runs(tiny_out).values():
        c = paper_verdicts.convergence([e["train_loss"] for e in r["epochs"]])
        entry = next(x for x in stored["runs"] if x["name"] == r["name"])
        assert entry["convergence"] == json.loads(json.dumps(c))
        line = next(x for x in runs_md.splitlines() if x.startswith(f"| {r['name']} |"))
        assert line.split("|")[8].strip() == ("yes" if c["converged"] else "**no**")
    summary = json.load(open(os.path.join(os.path.dirname(tiny_out), "summary.json")))
    assert summary["models"] == [MODEL]
    assert set(summary["verdicts"]) == {v["claim"] for v in stored["verdicts"]}


def test_default_arguments_are_both_models_five_seeds_and_the_controls(monkeypatch):
    monkeypatch.setattr(paper, "_has_gpu", lambda: False)
    args = paper.parse_args([])
    assert args.models == ["mnist1d_cnn", "mnist1d_mlp"]
    assert args.seeds == [0, 1, 2, 3, 4]
    assert args.schedules == [
        "constant",
        "B",
        "C",
        "BC",
        "linear",
        "constant_steps",
        "adaptive",
        "adaptive_C",
        "B_measured",
        "plateau",
        "plateau_C",
    ]
    assert (args.jobs, args.threads, args.steps_per_execution) == (os.cpu_count(), 1, 32)
    assert [paper.model_args(args, m).epochs for m in args.models] == [100, 200]
    assert paper.model_args(args, "mnist1d_mlp").out == os.path.join(args.out, "mnist1d_mlp")
    monkeypatch.setattr(paper, "_has_gpu", lambda: True)
    gpu = paper.parse_args(["--dataset", "cifar10"])
    assert (gpu.models, gpu.jobs, gpu.threads) == (["resnet18"], 1, 0)
    assert paper.model_args(gpu, "resnet18").epochs == 200
    given = paper.parse_args(["--epochs", "30", "--jobs", "0"])
    assert [paper.model_args(given, m).epochs for m in given.models] == [30, 30]
    assert given.threads == 0  # this process: TensorFlow's own setting


def _copy_with_seeds(tiny_out, dest, seeds, scale):
    """A model folder whose runs are the tiny runs under other seeds, with
    the sharpness of B multiplied by `scale(seed)` (no training)."""
    os.makedirs(os.path.join(dest, "runs"))
    for name in os.listdir(os.path.join(tiny_out, "runs")):
        record = paper_run.read_run(os.path.join(tiny_out, "runs", name))
        for seed in seeds:
            r = json.loads(json.dumps(record))
            r["seed"], r["name"] = seed, paper_run.run_name(r["method"], r["schedule"], seed)
            if r["schedule"] == "B":
                r["final"]["worst_case_sharpness"] *= scale(seed)
            paper_run.store_run(os.path.join(dest, "runs", r["name"] + paper_run.RUN_SUFFIX), r)


def test_report_of_several_seeds_gives_intervals_and_verdicts(tiny_out, tmp_path):
    from benchmarks.paper import verdicts as paper_verdicts

    out = str(tmp_path / "grid" / MODEL)
    # SAM's B is 0.5-0.6x SGD's B on every seed: "SAM flatter than SGD" on B.
    _copy_with_seeds(tiny_out, out, [0, 1, 2], lambda seed: 1.0)
    for seed, factor in zip([0, 1, 2], [0.5, 0.55, 0.6]):
        path = os.path.join(out, "runs", f"sam_B_seed{seed}.json.xz")
        r = paper_run.read_run(path)
        sgd = paper_run.read_run(os.path.join(out, "runs", f"sgd_B_seed{seed}.json.xz"))
        r["final"]["worst_case_sharpness"] = factor * sgd["final"]["worst_case_sharpness"]
        paper_run.store_run(path, r)
    assert paper_report.main(["--out", out]) == 12
    stored = json.load(open(os.path.join(out, "runs.json")))
    claim = next(v for v in stored["verdicts"] if v["claim"] == "SAM/GSAM are flatter than SGD")
    (c,) = claim["comparisons"]  # only B is in this grid, and no GSAM
    assert c["a"] == ["sam", "B"] and c["n"] == 3 and claim["total"] == 6
    ref = paper_verdicts.paired(
        {s: f for s, f in zip([0, 1, 2], [0.5, 0.55, 0.6])}, {0: 1.0, 1: 1.0, 2: 1.0}, log=True
    )
    assert c["ratio"] == pytest.approx(ref["ratio"], rel=1e-9)
    assert c["ratio_ci"] == pytest.approx(ref["ratio_ci"], rel=1e-9)
    assert c["verdict"] == claim["verdict"] == "reproduced"
    text = open(os.path.join(out, "results.md")).read()
    lo, hi = ref["ratio_ci"]
    assert f"ratio [{lo:.3g}, {hi:.3g}]" in text
    assert "1 comparisons (of 6; the grid lacks the others)" in text
    assert os.path.getsize(os.path.join(out, "verdicts.png")) > 0
    summary = open(os.path.join(os.path.dirname(out), "summary.md")).read()
    assert "reproduced (1 of 1 reproduced; 5 not in the grid)" in summary
    assert f"`{MODEL}/results.md`" in summary


def test_summary_covers_every_model_folder_of_the_grid(tiny_root, tiny_out, tmp_path):
    root = str(tmp_path / "grid")
    shutil.copytree(tiny_root, root)
    other = os.path.join(root, "mnist1d_mlp")
    _copy_with_seeds(tiny_out, other, [0], lambda seed: 1.0)
    for name in os.listdir(os.path.join(other, "runs")):
        path = os.path.join(other, "runs", name)
        r = paper_run.read_run(path)
        r["config"]["model"] = "mnist1d_mlp"
        paper_run.store_run(path, r)
    paper_report.main(["--out", other])  # one model folder ...
    summary = json.load(open(os.path.join(root, "summary.json")))
    assert summary["models"] == [MODEL, "mnist1d_mlp"]  # ... the summary has both
    # A rerun of one model's grid keeps the other's column too.
    paper.main(["--tiny", "--out", root])
    assert json.load(open(os.path.join(root, "summary.json")))["models"] == [MODEL, "mnist1d_mlp"]


def test_failing_run_in_a_worker_stops_the_grid_with_its_error(tmp_path):
    out = str(tmp_path / "fail")
    with pytest.raises(SystemExit, match="no full batch of 512"):
        paper.main(
            [
                "--tiny",
                "--num-samples",
                "100",
                "--initial-batch",
                "32",
                "--jobs",
                "2",
                "--threads",
                "1",
                "--out",
                out,
            ]
        )
    assert os.listdir(os.path.join(out, MODEL, "runs")) == []


def test_cifar_architectures_have_the_published_parameter_counts():
    """ResNet-18 with the CIFAR stem (kuangliu/pytorch-cifar, the authors'
    layout) and WRN-28-10 (Zagoruyko & Komodakis) for CIFAR-10: their
    published trainable parameter counts; CIFAR-100 adds 90 x 513 to the
    ResNet's last Dense layer."""
    from benchmarks import architectures

    def trainable(model):
        return sum(int(np.prod(w.shape)) for w in model.trainable_weights)

    cases = [
        (architectures.resnet18, 10, 11_173_962),
        (architectures.resnet18, 100, 11_173_962 + 90 * 513),
        (architectures.wide_resnet, 10, 36_479_194),
    ]
    for build, classes, count in cases:
        model = build(classes=classes)
        assert trainable(model) == count, model.name
        assert tuple(model.input.shape) == (None, 32, 32, 3)
        assert tuple(model.output.shape) == (None, classes)
        keras.backend.clear_session()


def test_runs_that_miss_the_criterion_are_named_and_left_out_in_a_second_view(tiny_out, tmp_path):
    from benchmarks.paper import verdicts as paper_verdicts

    out = str(tmp_path / "grid" / MODEL)
    _copy_with_seeds(tiny_out, out, [0, 1, 2], lambda seed: 1.0)
    path = os.path.join(out, "runs", "sam_B_seed1.json.xz")
    r = paper_run.read_run(path)
    r["epochs"][-1]["train_loss"] = 10 * r["epochs"][-2]["train_loss"]  # a last-epoch spike
    paper_run.store_run(path, r)
    paper_report.main(["--out", out])
    stored = json.load(open(os.path.join(out, "runs.json")))
    whole = sorted(
        _runs(out).values(), key=lambda x: [y["name"] for y in stored["runs"]].index(x["name"])
    )
    expected = [
        x["name"]
        for x in whole
        if not paper_verdicts.convergence([e["train_loss"] for e in x["epochs"]])["converged"]
    ]
    assert "sam_B_seed1" in expected and stored["unconverged"] == expected
    kept = [x for x in whole if x["name"] not in expected]
    assert stored["verdicts_converged"] == json.loads(json.dumps(paper_verdicts.verdicts(kept)))
    text = open(os.path.join(out, "results.md")).read()
    assert "## The claims without the runs that did not converge" in text
    assert "| sam_B_seed1 |" in open(os.path.join(out, "runs.md")).read()
    summary = open(os.path.join(os.path.dirname(out), "summary.md")).read()
    assert f"{MODEL}, converged runs only" in summary and "sam_B_seed1" in summary


def test_cifar_resnet18_gsam_run_with_mock_data(tmp_path):
    """The paper's own setting end to end on mock CIFAR-10: ResNet-18, GSAM,
    two steps, both measures."""
    tfds = pytest.importorskip("tensorflow_datasets")
    paper_data._DATA_CACHE.clear()
    out = str(tmp_path / "cifar")
    with tfds.testing.mock_data(num_examples=8):
        stats = paper.main(
            [
                "--dataset",
                "cifar10",
                "--model",
                "resnet18",
                "--methods",
                "gsam",
                "--schedules",
                "constant",
                "--seeds",
                "0",
                "--epochs",
                "1",
                "--batch",
                "4",
                "--sharpness-examples",
                "4",
                "--sharpness-iterations",
                "1",
                "--jobs",
                "0",
                "--out",
                out,
            ]
        )
    paper_data._DATA_CACHE.clear()
    assert stats == {"trained": 1, "skipped": 0}
    run = paper_run.read_run(os.path.join(out, "resnet18", "runs", "gsam_constant_seed0.json.xz"))
    assert run["steps_per_epoch"] == [2] and run["epochs"][0]["iterations"] == 2
    assert run["config"]["model"] == "resnet18" and run["config"]["epochs"] == 1
    final = run["final"]
    assert final["worst_case_sharpness"] >= 0 and final["full_gradient_norm"] > 0
    assert math.isfinite(final["train_loss"])


# ---------------------------------------------------------------------------
# Training on until the loss stops moving.


class _Log:
    def __init__(self, losses):
        self.epochs = [{"train_loss": x} for x in losses]


def test_stop_when_converged_only_from_the_planned_epochs_on():
    class FakeModel:
        stop_training = False

    losses = [2.0, 0.50, 0.49, 0.30, 0.20, 0.195, 0.195, 0.195]
    stops = []
    for n in range(1, len(losses) + 1):
        cb = paper_run.StopWhenConverged(4, _Log(losses[:n]))
        cb.set_model(FakeModel())
        cb.on_epoch_end(n - 1)
        stops.append(cb.model.stop_training)
    # Epoch 3 (0.50 -> 0.49) meets the criterion but comes before the 4 planned
    # epochs; epochs 4 and 5 (0.49 -> 0.30 -> 0.20) do not; epoch 6
    # (0.20 -> 0.195, within 0.01) does.
    assert stops == [False, False, False, False, False, True, True, True]


def test_a_run_trains_on_past_its_epochs_only_while_its_loss_moves(tmp_path):
    from benchmarks.paper import verdicts as paper_verdicts

    common = ["--tiny", "--methods", "sgd", "--schedules", "B"]
    plain, extended = str(tmp_path / "plain"), str(tmp_path / "extended")
    paper.main([*common, "--out", plain])
    paper.main([*common, "--extend-until-converged", "1", "--out", extended])
    (a,), (b,) = (
        _runs(os.path.join(plain, MODEL)).values(),
        _runs(os.path.join(extended, MODEL)).values(),
    )
    assert b["base_epochs"] == a["base_epochs"] == len(a["epochs"]) == 5
    keys = ("train_loss", "test_error", "learning_rate", "iterations", "batch_size")
    # The planned epochs are exactly the plain run's ...
    assert [[e[k] for k in keys] for e in b["epochs"][:5]] == [
        [e[k] for k in keys] for e in a["epochs"]
    ]
    # ... then it trains on at the last batch size, up to 5 more epochs, and
    # stops at the first epoch at which the loss has stopped moving.
    assert 5 <= len(b["epochs"]) <= 10
    assert all(e["batch_size"] == 256 for e in b["epochs"][5:])
    losses = [e["train_loss"] for e in b["epochs"]]
    done = [paper_verdicts.convergence(losses[:n])["converged"] for n in range(5, len(losses) + 1)]
    assert not any(done[:-1])
    assert done[-1] or len(losses) == 10
    assert b["steps_per_epoch"] == [e["steps"] for e in b["epochs"]]
    assert b["config"]["extend_until_converged"] == 1.0
    assert (
        "--extend-until-converged 1"
        in open(os.path.join(extended, MODEL, "results.md")).read().split("\n")[2]
    )


def test_stored_run_of_another_extension_rule_counts_only_if_never_extended(tiny_out, tmp_path):
    path = str(tmp_path / "run.json")
    record = paper_run.read_run(os.path.join(tiny_out, "runs", "sgd_B_seed0.json.xz"))
    del record["config"]["extend_until_converged"]  # stored before the rule
    config = dict(paper_run.normalized_config(record["config"]), extend_until_converged=0.2)
    record["epochs"][-1]["train_loss"] = record["epochs"][-2]["train_loss"]  # converged
    paper_run.store_run(path, record)
    assert paper_run.load_run(path, config)["config"] == config
    assert json.load(open(path))["config"] == config  # stored with this rule now
    record["epochs"][-1]["train_loss"] = 2 * record["epochs"][-2]["train_loss"]  # moving
    paper_run.store_run(path, record)
    with pytest.raises(SystemExit, match="extend_until_converged"):
        paper_run.load_run(path, config)


def test_adaptive_schedules_decide_from_the_logged_noise_scale(tmp_path):
    out = str(tmp_path / "adaptive")
    stats = paper.main(
        [
            "--tiny",
            "--methods",
            "sgd",
            "--schedules",
            "B,adaptive,adaptive_C,B_measured",
            "--out",
            out,
        ]
    )
    assert stats["trained"] == 4
    runs = {r["schedule"]: r for r in _runs(os.path.join(out, MODEL)).values()}
    from keras_sam.callbacks.adaptive_batch_size import next_batch_size

    for schedule in ("adaptive", "adaptive_C"):
        r = runs[schedule]
        epochs = r["epochs"]
        policy = paper_run.batch_schedule(
            paper.model_args(paper.parse_args(["--tiny"]), MODEL), schedule
        )
        last = 0
        for i, e in enumerate(epochs):
            assert e["next_batch_size"] == next_batch_size(
                e["batch_size"], e["noise_scale"], i + 1 - last, policy
            )
            if i + 1 < len(epochs):
                assert epochs[i + 1]["batch_size"] == e["next_batch_size"]
                last = i + 1 if e["next_batch_size"] != e["batch_size"] else last
        changes = {0: epochs[0]["batch_size"]}
        changes.update(
            {
                i: e["batch_size"]
                for i, e in enumerate(epochs)
                if i and e["batch_size"] != epochs[i - 1]["batch_size"]
            }
        )
        assert r["batch_schedule"] == {str(k): v for k, v in changes.items()}
        assert r["final"]["steps"] == sum(r["steps_per_epoch"])
    # B with the estimate on: B's batch sizes and steps, and a noise scale per epoch.
    assert runs["B_measured"]["steps_per_epoch"] == runs["B"]["steps_per_epoch"]
    assert all("noise_scale" in e for e in runs["B_measured"]["epochs"])
    assert not any("noise_scale" in e for e in runs["B"]["epochs"])
    text = open(os.path.join(out, MODEL, "results.md")).read()
    assert "| **adaptive needs no more optimizer steps than +B** |" in text
    assert os.path.exists(os.path.join(out, MODEL, "noise_scale.png"))


def test_plateau_schedules_follow_reduce_lr_on_plateaus_rule(tmp_path, monkeypatch):
    from benchmarks.paper import protocol
    from benchmarks.paper import verdicts

    # The protocol's patience (10) outlasts --tiny's 5 epochs: a patience of 1
    # and a min_delta that some epochs beat and some do not exercise the rule.
    monkeypatch.setitem(paper_run.PLATEAU_CONFIG, "plateau_patience", 1)
    min_delta = 0.18  # --tiny's losses fall by 0.1-0.3 an epoch
    monkeypatch.setitem(paper_run.PLATEAU_CONFIG, "plateau_min_delta", min_delta)
    out = str(tmp_path / "plateau")
    # A grid into a folder that holds other runs reports them too.
    assert (
        paper.main(["--tiny", "--methods", "sgd", "--schedules", "B", "--out", out])["trained"] == 1
    )
    stats = paper.main(
        ["--tiny", "--methods", "sgd", "--schedules", "plateau,plateau_C", "--out", out]
    )
    assert stats["trained"] == 2
    runs = {r["schedule"]: r for r in _runs(os.path.join(out, MODEL)).values()}
    args = paper.model_args(paper.parse_args(["--tiny"]), MODEL)
    b0, largest = args.initial_batch, args.initial_batch * 2 ** (protocol.STAGES - 1)
    grew = 0
    for schedule in ("plateau", "plateau_C"):
        r = runs[schedule]
        # ReduceLROnPlateau's rule (mode "min", cooldown 0) replayed by hand
        # on the logged training losses.
        best, wait, size, changes = math.inf, 0, b0, {0: b0}
        for i, e in enumerate(r["epochs"]):
            assert e["batch_size"] == size, (schedule, i)
            assert "noise_scale" in e  # logged for the plots
            if e["train_loss"] < best - min_delta:
                best, wait = e["train_loss"], 0
            else:
                wait += 1
                if wait >= 1 and size < largest:
                    size, wait = min(2 * size, largest), 0
                    changes[i + 1] = size
            assert e["next_batch_size"] == size
        grew += len(changes) > 1
        assert r["batch_schedule"] == {str(k): v for k, v in changes.items()}
        assert r["config"]["plateau_patience"] == 1
        assert r["final"]["steps"] == sum(r["steps_per_epoch"])
        assert r["final"]["examples"] == sum(e["steps"] * e["batch_size"] for e in r["epochs"])
    assert grew, "no plateau run grew its batch: the test checks nothing"
    # plateau_C: the cosine rate per step over the steps of the batch sizes
    # taken, so at each epoch's end the rate of the whole epochs done (closed form).
    r = runs["plateau_C"]
    for i, e in enumerate(r["epochs"]):
        p = (i + 1) / r["base_epochs"]
        lr, final = protocol.LR, protocol.LR_FINAL
        cosine = final + (lr - final) * (1 + math.cos(math.pi * p)) / 2
        np.testing.assert_allclose(e["learning_rate"], cosine, rtol=1e-5)
    rates = [e["learning_rate"] for e in runs["plateau"]["epochs"]]
    np.testing.assert_allclose(rates, protocol.LR, rtol=1e-6)
    text = open(os.path.join(out, MODEL, "results.md")).read()
    for schedule in ("B", "plateau", "plateau_C"):
        assert f"| sgd | {schedule} |" in text
    for claim in (
        "plateau is at least as flat as +B",
        "plateau is at least as flat as +B's steps-matched control (constant_steps)",
        "plateau needs no more optimizer steps than +B",
        "plateau needs no more examples than +B",
        "plateau has a test error no higher than +B",
        "plateau has a test error no higher than constant",
    ):
        assert claim in {c[0] for c in verdicts.CLAIMS}
    assert "| **plateau needs no more optimizer steps than +B** |" in text
    grid = json.load(open(os.path.join(out, MODEL, "runs.json")))["grid"]
    assert (grid["schedules"], grid["total"]) == (["B", "plateau", "plateau_C"], 3)
