"""The wrappers that make `fit` train any Keras model sharpness-aware.

One family per module, on the step they share:

- `engine.py`: `StepEngine`, the training step every wrapper runs (gradient
  passes, sub-batches, replicas, noise scale, the train steps);
- `host_steps.py`: the kind of the next step (SAM, plain, ...) chosen on the
  host, one compiled function per kind;
- `sam.py`: `SAMModel` (SAM, ASAM, `sam_every=k`) and
  `SharpnessAwareMinimization` (tf.keras' old signature);
- `gsam.py`: `GSAMModel`, the surrogate-gap descent and its learning-rate-tied radius;
- `looksam.py`: `LookSAMModel`, the reused direction between refreshes;
- `aesam.py`: `AESAMModel`, SAM steps where the gradient norm is high;
- `msam.py`: `MSAMModel`, Momentum-SAM: one gradient, along the momentum;
- `mesa.py`: `MESAModel`, MESA: distillation from a moving average of the weights;
- `rwp.py`: `RWPModel` and `FlatLoRAModel`: one gradient at randomly
  perturbed weights (all weights; LoRA's merged weights).
"""

from keras_sam.models.aesam import AESAMModel
from keras_sam.models.engine import TRAINING_STATISTICS
from keras_sam.models.gsam import GSAMModel
from keras_sam.models.looksam import LookSAMModel
from keras_sam.models.mesa import MESAModel
from keras_sam.models.msam import MSAMModel
from keras_sam.models.rwp import FlatLoRAModel
from keras_sam.models.rwp import RWPModel
from keras_sam.models.sam import ADAPTIVE_SCOPES
from keras_sam.models.sam import SAMModel
from keras_sam.models.sam import SharpnessAwareMinimization
from keras_sam.models.sam import asam_scaled

__all__ = [
    "ADAPTIVE_SCOPES",
    "TRAINING_STATISTICS",
    "AESAMModel",
    "FlatLoRAModel",
    "GSAMModel",
    "LookSAMModel",
    "MESAModel",
    "MSAMModel",
    "RWPModel",
    "SAMModel",
    "SharpnessAwareMinimization",
    "asam_scaled",
]
