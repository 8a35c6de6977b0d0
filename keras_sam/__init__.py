"""keras_sam: sharpness-aware minimization (SAM, ASAM, GSAM) for Keras 3.

Public names:

- `SAMModel`, `GSAMModel`, `SharpnessAwareMinimization`: wrap any Keras model
  so that `fit` trains it with a sharpness-aware step (`keras_sam.models`);
  `sam_every=k` takes the second gradient every k-th step only;
- `LookSAMModel`, `AESAMModel`: cheaper schedules of SAM's second gradient
  (LookSAM's reused direction, AE-SAM's adaptive switching);
- `MSAMModel`, `MESAModel`: SAM's aim at one gradient per step
  (Momentum-SAM's perturbation along the momentum, MESA's EMA teacher);
- `RWPModel`, `FlatLoRAModel`: one gradient at randomly perturbed weights
  (RWP on all weights; Flat-LoRA on LoRA layers' merged weights);
- `keras_sam.rules`: the math of one step, backend-neutral;
- `keras_sam.schedules`: epoch-aware learning-rate schedules;
- `keras_sam.callbacks`: `BatchSizeScheduler`, `AdaptiveBatchSize`, `SharpnessMonitor`;
- `BatchSchedule`: the global batch size per epoch (dict, int or callable),
  read by `BatchSizeScheduler`, `schedules.steps_per_epoch` and the benchmarks;
- `keras_sam.sharpness`: worst-case sharpness, full-gradient norm, Hessian
  eigenvalue;
- `keras_sam.datasets`: MNIST-1D, generated offline.
"""

from keras_sam import callbacks
from keras_sam import datasets
from keras_sam import rules
from keras_sam import schedules
from keras_sam import sharpness
from keras_sam.batch_schedule import BatchSchedule
from keras_sam.models import AESAMModel
from keras_sam.models import FlatLoRAModel
from keras_sam.models import GSAMModel
from keras_sam.models import LookSAMModel
from keras_sam.models import MESAModel
from keras_sam.models import MSAMModel
from keras_sam.models import RWPModel
from keras_sam.models import SAMModel
from keras_sam.models import SharpnessAwareMinimization

__version__ = "0.4.0"

__all__ = [
    "SAMModel",
    "GSAMModel",
    "LookSAMModel",
    "AESAMModel",
    "MSAMModel",
    "MESAModel",
    "RWPModel",
    "FlatLoRAModel",
    "BatchSchedule",
    "SharpnessAwareMinimization",
    "callbacks",
    "datasets",
    "rules",
    "schedules",
    "sharpness",
]
