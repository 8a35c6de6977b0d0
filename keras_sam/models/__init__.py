"""The wrappers that make `fit` train any Keras model sharpness-aware.

One family per module, on the step they share:

- `method.py`: the contract of a method, `TwoGradientModel` (the SAM step's
  clean and perturbed gradients) and `OneGradientModel` (one gradient at
  perturbed weights), on `engine.py`'s `StepEngine` (the Keras side);
- the engine's rooms: `_passes.py` (gradient passes, sub-batches),
  `host_steps.py` (the kind of the next step, chosen on the host),
  `_replicas.py` (replicas, devices, loss scaling), `_noise.py` (the
  gradient noise scale), `_train_steps.py` (the per-backend train steps);
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
from keras_sam.models.method import OneGradientModel
from keras_sam.models.method import TwoGradientModel
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
    "OneGradientModel",
    "RWPModel",
    "SAMModel",
    "SharpnessAwareMinimization",
    "TwoGradientModel",
    "asam_scaled",
]
