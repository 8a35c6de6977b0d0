"""benchmarks/lora_study.py: its verdict rule on hand-written intervals, its
paired comparison on hand-made runs, and a tiny end-to-end run."""

import json
import math

import pytest

from benchmarks import lora_study


def interval(lo, hi):
    return {"ci": (lo, hi)}


@pytest.mark.parametrize(
    "log_ratio, error, expected",
    [
        ((-0.5, -0.1), (-1.0, 0.0), "yes"),  # flatter, no error cost
        ((-0.5, -0.1), (-1.0, 0.5), "flatter, test error not settled"),
        ((-0.5, -0.1), (0.1, 0.5), "no"),  # costs test error
        ((0.0, 0.3), (-1.0, -0.5), "no"),  # not flatter
        ((-0.2, 0.2), (-1.0, 0.5), "not settled"),
    ],
)
def test_verdict_table(log_ratio, error, expected):
    assert lora_study.verdict(interval(*log_ratio), interval(*error)) == expected


def test_paired_comparisons_against_adamw():
    """Flat-LoRA half as sharp as AdamW on every seed, one point lower
    test error on every seed: ratio 0.5 exactly, difference -1 exactly."""
    runs = []
    for seed in range(3):
        base = dict(sharpness_full=0.1 * (seed + 1), sharpness_trained=0.01, test_error=10.0 + seed)
        runs.append(dict(method="adamw", seed=seed, **base))
        runs.append(
            dict(
                method="flat_lora",
                seed=seed,
                sharpness_full=base["sharpness_full"] / 2,
                sharpness_trained=0.01,
                test_error=base["test_error"] - 1,
            )
        )
    rows, table = lora_study.summarize(runs, range(3))
    flat = next(r for r in rows if r["method"] == "flat_lora")
    assert math.isclose(flat["full_ratio"]["ratio"], 0.5)
    assert flat["error_difference"]["mean_difference"] == pytest.approx(-1.0)
    assert flat["verdict"] == "yes"
    assert "Flat-LoRA" in table and "0.50 [0.50, 0.50]" in table


def test_a_tiny_study_writes_its_results(tmp_path):
    out = tmp_path / "study"
    lora_study.main(
        [
            "--seeds", "0,1",
            "--methods", "adamw,flat_lora",
            "--pretrain-epochs", "1",
            "--epochs", "1",
            "--num-samples", "400",
            "--sharpness-examples", "32",
            "--sharpness-iterations", "2",
            "--out", str(out),
        ]
    )  # fmt: skip
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == [
        ("adamw", 0), ("adamw", 1), ("flat_lora", 0), ("flat_lora", 1)
    ]  # fmt: skip
    assert all(r["sharpness_full"] >= 0 and 0 <= r["test_error"] <= 100 for r in runs)
    assert (out / "lora_study.png").stat().st_size > 0
    assert "| Flat-LoRA | 2 |" in (out / "results.md").read_text()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--methods", "sam"], "adamw"),
        (["--methods", "adamw,lion"], "unknown"),
        (["--seeds", "a,b"], "--seeds"),
        (["--epochs", "0"], "--epochs"),
    ],
)
def test_bad_arguments_stop_before_training(argv, match, capsys):
    with pytest.raises(SystemExit):
        lora_study.main(argv)
    assert match in capsys.readouterr().err
