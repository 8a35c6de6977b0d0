"""Cheaper SAM on MNIST-1D: does a cheaper schedule keep 90% of SAM's
flatness at <= 1.25x SGD's step cost without costing accuracy?

Trains both MNIST-1D networks of `benchmarks.paper` (the CNN with BatchNorm,
the MLP without normalization) with plain SGD, SAM, GSAM, SAM with its second
gradient every k-th step only (`sam_every` 2, 5, 10), LookSAM (`sam_every=5`,
`alpha` 0.7, 0.3 and 0.1), AE-SAM (threshold `AESAM_THRESHOLD`, about a
quarter of the steps are SAM steps), MESA, and Momentum-SAM with its own
baseline (SGD with momentum, which it needs), all with the same data, epochs,
batch size, learning-rate schedule and radius, over five seeds. A run whose
training loss still moves after its epochs trains on until it stops (the
paper benchmark's convergence criterion, reported per run in `runs.md`).
After each run: worst-case sharpness and full-gradient norm (the paper
benchmark's measures, from `benchmarks.paper.run.train_one`) and the test error.

The cost of a method is its time per step as a user timing epochs sees it:
each epoch's wall time from its first step to the end of its last over its
steps, the median over the epochs after the first (tracing), divided by
SGD's of the same seed; the median over seeds. "Fraction kept" is the share
of SAM's sharpness reduction a method keeps,
`(sharp_SGD - sharp_method) / (sharp_SGD - sharp_SAM)`, from the means and
seed by seed (same initialization and data order) with a Student-t 95%
interval; the test error is compared with SGD's and SAM's seed by seed likewise.
`verdict` turns the intervals into yes / no / not settled.

Run from the repository root:

    python -m benchmarks.efficient                 # 130 runs, ~25 min on 2 cores
    python -m benchmarks.efficient --methods sgd,sam,looksam5 --seeds 0 --epochs 2

Outputs (in `--out`, default benchmarks/results/efficient): `results.md`,
`runs.md`, `summary.json`, `sharpness_vs_cost.png` and
`runs/<model>/<method>_<schedule>_seed<k>.json` (one per finished run,
written atomically; rerunning the same command skips them, and a stored run
made with another configuration is an error).
"""

from benchmarks.efficient.grid import main  # noqa: F401
