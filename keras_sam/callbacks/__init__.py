"""Keras callbacks of keras_sam.

- `BatchSizeScheduler`: grows (or changes) the batch size at scheduled epochs
  inside one `fit`, rebuilding the user's `tf.data` pipeline.
- `doubling_schedule`: the paper's 16 -> 256 doubling schedule in one line.
- `AdaptiveBatchSize`: a `BatchSizeScheduler` schedule that grows the batch
  when the model's measured gradient noise scale says so.
- `BatchSizeOnPlateau`: one that grows the batch when a monitored metric has
  stalled, with `ReduceLROnPlateau`'s rules.
- `SharpnessMonitor`: logs worst-case sharpness, full-gradient norm and the
  Hessian's top eigenvalue into History / CSVLogger / TensorBoard.
"""

from keras_sam.callbacks.adaptive_batch_size import AdaptiveBatchSize
from keras_sam.callbacks.batch_size_on_plateau import BatchSizeOnPlateau
from keras_sam.callbacks.batch_size_scheduler import BatchSizeScheduler
from keras_sam.callbacks.batch_size_scheduler import doubling_schedule
from keras_sam.callbacks.sharpness_monitor import SharpnessMonitor

__all__ = [
    "AdaptiveBatchSize",
    "BatchSizeOnPlateau",
    "BatchSizeScheduler",
    "SharpnessMonitor",
    "doubling_schedule",
]
