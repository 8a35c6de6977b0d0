"""Rerun the comparison of Harada & Iiduka (arXiv 2409.09984) with one command.

Grid: {sgd, sam, gsam} x {constant, B, C, BC, linear} x seeds, with the
paper's protocol: plain SGD (no momentum, no weight decay), lr 0.1, rho 0.05,
alpha 0.02 (GSAM's rho constant), cross-entropy, last partial batch dropped.

- constant: batch `--batch` (128), lr 0.1;
- B: batch doubles over five equal stages from `--initial-batch` (16 -> 256),
  lr 0.1 constant;
- C: batch 128, cosine per step 0.1 -> 0.001;
- linear: batch 128, linear per step 0.1 -> 0.001;
- BC: increasing batch and cosine (per-epoch step counts from the scheduler).

After each run: worst-case sharpness (L-inf Auto-PGD, rho 2e-4, 20
iterations, first `--sharpness-examples` training examples in batches of 128,
inference mode) and the full-gradient norm on the whole (un-augmented)
training set, both by `keras_sam.callbacks.SharpnessMonitor`.

Run from the repository root:

    python -m benchmarks.paper                      # MNIST-1D, CPU-sized
    python -m benchmarks.paper --dataset cifar10 --model resnet18 --epochs 200 \\
        --seeds 0,1,2                               # the paper's setting (GPU)
    python -m benchmarks.paper.report --out benchmarks/results/mnist1d
                                                    # report from the stored runs

The CPU default (MNIST-1D, 4000 examples = 3200 train / 800 test, 20 epochs
= 5 stages of 4 epochs, 3 seeds, 45 runs) finishes in well under an hour on a
2-core CPU; `results.md` records the wall time. Caveat of this scale: with
3200 examples the batch-128 schedules (constant, C, linear) get 25 steps per
epoch, about a third of what B / BC get (batch 16 first), so they are less
converged; use `--epochs 40` or more (the paper: 200) to compare converged
models. Outputs go to `--out` (default benchmarks/results/<dataset>):
`results.md`, `runs.json`, PNG plots and `runs/<method>_<schedule>_seed<k>.json`
(one per finished run, written atomically; rerunning the same command skips
them). `results.md`, `runs.json` and the plots are derived from `runs/` only,
and `python -m benchmarks.paper.report --out DIR` rebuilds them.

Modules:

- `protocol`: the grid's names and the paper's constants;
- `data`: MNIST-1D / CIFAR arrays and tf.data pipelines, the memory estimate;
- `run`: one run (model, fit, measures) and the run files;
- `report`: tables, plots, and the report command;
- `cli`: the command line, the main loop and its progress lines.
"""

import os

# Before TensorFlow is first imported (by any module of the package).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
