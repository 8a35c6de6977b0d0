"""Rerun the comparison of Harada & Iiduka (arXiv 2409.09984) with one command.

Grid: models x {sgd, sam, gsam} x {constant, B, C, BC, linear,
constant_steps, adaptive, adaptive_C, B_measured, plateau, plateau_C} x seeds, with the paper's
protocol: plain SGD (no momentum, no weight decay), lr 0.1, rho 0.05, alpha
0.02 (GSAM's rho constant), cross-entropy, last partial batch dropped.

- constant: batch `--batch` (128), lr 0.1;
- B: batch doubles over five equal stages from `--initial-batch` (16 -> 256),
  lr 0.1 constant;
- C: batch 128, cosine per step 0.1 -> 0.001;
- linear: batch 128, linear per step 0.1 -> 0.001;
- BC: increasing batch and cosine (per-epoch step counts from the scheduler);
- constant_steps: the steps-matched control of B: batch 128, lr 0.1, the
  fewest whole epochs with at least B's number of optimizer steps
  (`constant` is the examples-matched control: same epochs as B);
- adaptive, adaptive_C: the batch doubles from `--initial-batch` (up to B's
  largest, 256) at an epoch's end when the measured gradient noise scale
  has reached it (`keras_sam.callbacks.AdaptiveBatchSize`, threshold 1),
  lr 0.1 constant / cosine 0.1 -> 0.001;
- B_measured: B with the noise scale estimate on (its curve in
  `noise_scale.png`);
- plateau, plateau_C: the batch doubles from `--initial-batch` (up to 256)
  where `ReduceLROnPlateau` with its defaults (patience 10, min_delta 1e-4,
  cooldown 0) on the training loss would cut the rate
  (`keras_sam.callbacks.BatchSizeOnPlateau`), lr 0.1 constant / cosine.
  These five train SGD as `SAMModel(rho=0)` and every method with
  `noise_scale=True`.

After each run: worst-case sharpness (L-inf Auto-PGD, rho 2e-4, 20
iterations, first `--sharpness-examples` training examples in batches of 128,
inference mode) and the full-gradient norm on the whole (un-augmented)
training set, both by `keras_sam.callbacks.SharpnessMonitor`.

Run from the repository root:

    python -m benchmarks.paper                      # MNIST-1D, CNN and MLP
    python -m benchmarks.paper --dataset cifar10 --model resnet18
                                                    # the paper's setting (GPU)
    python -m benchmarks.paper.report --out benchmarks/results/mnist1d
                                                    # report from the stored runs
    python -m benchmarks.paper.compare BEFORE AFTER # two runs of one grid

The CPU default (MNIST-1D, 4000 examples = 3200 train / 800 test; the CNN
with BatchNorm for 100 epochs and the MLP without normalization for 200, so
that every run's training loss stops moving, and a run whose loss still
moves then trains on at its final batch size and rate until it stops, for at
most 20% more epochs; 5 seeds; 330 runs) takes about two and a half hours
on a 2-core CPU, two runs side by side with one thread each (the 90 runs of
the adaptive and measured schedules took 43 minutes, partly beside another
job; the 60 plateau runs 48 minutes, partly beside tests).
Outputs go to `--out` (default benchmarks/results/<dataset>), one folder per
model: `results.md` (the table and the claims' verdicts), `runs.md` (each
run's length and convergence), `runs.json`, PNG plots and
`runs/<method>_<schedule>_seed<k>.json` (one per finished run, written
atomically; rerunning the same command skips them); beside the model folders
`summary.md`, each claim's verdict per model. Everything but `runs/` is
derived from the stored runs, and `python -m benchmarks.paper.report --out
DIR` rebuilds it.

Modules:

- `protocol`: the grid's names, the paper's constants, the convergence rule;
- `data`: MNIST-1D / CIFAR arrays and tf.data pipelines, the memory estimate;
- `run`: one run (model, fit, measures) and the run files;
- `verdicts`: convergence, paired comparisons across seeds, the claims;
- `report`: tables, plots, verdicts, and the report command;
- `compare`: wall time and results of two runs of one grid;
- `cli`: the command line, the worker processes and their progress lines.
"""

# TensorFlow is imported without its C++ start-up lines by `benchmarks`
# (benchmarks/__init__.py), before any module of this package.
