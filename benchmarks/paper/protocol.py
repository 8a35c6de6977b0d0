"""The grid's names and the paper's protocol constants."""

import os

from benchmarks import architectures

METHODS = ("sgd", "sam", "gsam")
SCHEDULES = ("constant", "B", "C", "BC", "linear")
INCREASING = ("B", "BC")
STAGES = 5

DATASETS = {
    # name: (default model, classes)
    "mnist1d": ("mnist1d_cnn", 10),
    "cifar10": ("resnet18", 10),
    "cifar100": ("resnet18", 100),
}
CIFAR_SIZES = {"cifar10": (50000, 10000), "cifar100": (50000, 10000)}

MODELS = {**architectures.ARCHITECTURES, "tiny_cnn2d": architectures.tiny_cnn2d}

# Protocol constants (the paper's).
LR = 0.1
LR_FINAL = 0.001
RHO = 0.05
ALPHA = 0.02
SHARPNESS_RHO = 2e-4
SHARPNESS_BATCH = 128
GRADIENT_NORM_BATCH = 500

SCHEDULE_TEXT = {
    "constant": "batch {batch}, lr 0.1",
    "B": "batch {b0}->{bmax} doubling over 5 equal stages, lr 0.1",
    "C": "batch {batch}, cosine lr 0.1->0.001 per step",
    "BC": "batch {b0}->{bmax} doubling + cosine lr 0.1->0.001 per step",
    "linear": "batch {batch}, linear lr 0.1->0.001 per step",
}

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "results")
"""benchmarks/results: the default output folders are below it."""

COMMAND = "python -m benchmarks.paper"
"""How the grid is run (from the repository root); reports quote it."""
