"""The grid's names and the paper's protocol constants."""

import os

from benchmarks import architectures

METHODS = ("sgd", "sam", "gsam")
SCHEDULES = (
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
)
INCREASING = ("B", "BC", "B_measured")
ADAPTIVE = ("adaptive", "adaptive_C")
"""The batch grows when the measured gradient noise scale says so
(`keras_sam.callbacks.AdaptiveBatchSize`, from the initial batch up to B's
largest, constant rate or cosine)."""
PLATEAU = ("plateau", "plateau_C")
"""The batch grows when the training loss has stalled
(`keras_sam.callbacks.BatchSizeOnPlateau`, `ReduceLROnPlateau`'s rule and
defaults, from the initial batch up to B's largest, constant rate or
cosine)."""
GROWN = ADAPTIVE + PLATEAU
"""The schedules whose batch sizes are decided during training."""
MEASURED = ("B_measured",)
"""B with the noise scale estimate switched on: the noise scale of B's
training for the plots, and the like-for-like comparison with the adaptive
batch (on one device the estimate evaluates the clean gradient as the two
halves of the batch, which changes a BatchNorm model's step)."""
NOISE_SCALE = GROWN + MEASURED
"""The schedules whose models estimate the noise scale (the plateau rule does
not read it; its runs log it for the plots and train like-for-like with the
noise-scale rule and B_measured)."""
STEPS_CONTROL = "constant_steps"
"""The steps-matched control of B: the constant batch and rate, trained for as
many optimizer steps as B takes (in whole epochs, so up to one epoch more).
`constant` itself is the examples-matched control (same epochs)."""
STAGES = 5

DATASETS = {
    # name: (default models, classes, default epochs)
    "mnist1d": (("mnist1d_cnn", "mnist1d_mlp"), 10, None),
    "cifar10": (("resnet18",), 10, 200),
    "cifar100": (("resnet18",), 100, 200),
}
MNIST1D_EPOCHS = {"mnist1d_cnn": 100, "mnist1d_mlp": 200}
"""Default epochs of the MNIST-1D models: long enough for every schedule's
training loss to stop moving (`CONVERGENCE_*` below; 3,200 training examples
give 25 steps per epoch at batch 128). The MLP learns more slowly at lr 0.1."""
INPUT_KIND = {"mnist1d": "signal", "cifar10": "image", "cifar100": "image"}
MODEL_INPUT = {
    "mnist1d_cnn": "signal",
    "mnist1d_mlp": "signal",
    "resnet18": "image",
    "wrn28_10": "image",
    "tiny_cnn2d": "image",
}
"""Which data sets a model takes: MNIST-1D's (40, 1) signals or 32x32 images."""
CIFAR_SIZES = {"cifar10": (50000, 10000), "cifar100": (50000, 10000)}

MODELS = {**architectures.ARCHITECTURES, "tiny_cnn2d": architectures.tiny_cnn2d}

# Protocol constants (the paper's).
LR = 0.1
LR_FINAL = 0.001
RHO = 0.05
ALPHA = 0.02
ADAPTIVE_THRESHOLD = 1.0
"""Grow when B_simple >= 1 x batch: the batch has reached the noise scale
(McCandlish et al.'s critical batch size is about B_simple)."""
ADAPTIVE_FACTOR = 2
ADAPTIVE_MIN_EPOCHS = 1
PLATEAU_MONITOR = "loss"
PLATEAU_PATIENCE = 10
PLATEAU_MIN_DELTA = 1e-4
PLATEAU_COOLDOWN = 0
"""The plateau rule as a Keras user would start it: `ReduceLROnPlateau`'s
defaults (patience 10, min_delta 1e-4, cooldown 0) on the training loss (the
test set stays out of every decision), the batch doubled (factor 2)."""
NOISE_SCALE_DECAY = 0.99
"""The moving average of the noise scale estimates (about 100 steps)."""
SHARPNESS_RHO = 2e-4
SHARPNESS_BATCH = 128
GRADIENT_NORM_BATCH = 500

SCHEDULE_TEXT = {
    "constant": "batch {batch}, lr 0.1",
    "B": "batch {b0}->{bmax} doubling over 5 equal stages, lr 0.1",
    "C": "batch {batch}, cosine lr 0.1->0.001 per step",
    "BC": "batch {b0}->{bmax} doubling + cosine lr 0.1->0.001 per step",
    "linear": "batch {batch}, linear lr 0.1->0.001 per step",
    "constant_steps": "batch {batch}, lr 0.1, as many steps as B ({control_epochs} "
    "epochs; the steps-matched control)",
    "adaptive": "batch {b0}->{bmax}, doubled at an epoch's end when the measured "
    "noise scale >= {threshold:g} x batch, lr 0.1",
    "adaptive_C": "the adaptive batch + cosine lr 0.1->0.001 per step",
    "B_measured": "B with the noise scale estimate on",
    "plateau": "batch {b0}->{bmax}, doubled at an epoch's end when the training loss "
    "has not fallen by more than {min_delta:g} for {patience} epochs, lr 0.1",
    "plateau_C": "the plateau batch + cosine lr 0.1->0.001 per step",
}

EXTEND_UNTIL_CONVERGED = 0.2
"""A run whose training loss still moves after its epochs (the criterion
below) trains on, one epoch at a time at its final batch size and rate,
until it has stopped moving, for at most this fraction of its epochs more."""

CONVERGENCE_WINDOW = 0.1
CONVERGENCE_RELATIVE = 0.05
CONVERGENCE_ABSOLUTE = 0.01
"""A run has converged when its epoch-mean training loss changed by less
than 5% or by less than 0.01 (whichever is larger) over the last 10% of its
epochs: |L(E) - L(E - w)| < max(0.05 L(E - w), 0.01), w = max(1, round(0.1 E))."""

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
"""benchmarks/results: the default output folders are below it."""

COMMAND = "python -m benchmarks.paper"
"""How the grid is run (from the repository root); reports quote it."""
