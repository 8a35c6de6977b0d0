"""A small KerasHub Gemma causal LM with NumPy-drawn weights (offline, the
same numbers on every backend and process), shared by test_fine_tuning.py
and model_parallel_check.py. Needs keras-hub (the `[hub]` extra)."""

import keras
import keras_hub
import numpy as np


def numpy_weights(model, seed):
    """Backends and runs draw different initial weights; use NumPy's."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if keras.backend.is_float_dtype(v.dtype):
            v.assign(rng.normal(scale=0.2, size=v.shape).astype(v.dtype))


def gemma_causal_lm(vocab, lora, seed=0, query_heads=2, key_value_heads=1, head_dim=8):
    """`GemmaCausalLM` (2 layers, hidden 16) without a preprocessor; `lora`:
    `enable_lora(rank=2)` on the backbone before the weights are drawn, so
    LoRA's B is drawn too (a zero B would stop A's gradient)."""
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=vocab,
        num_layers=2,
        num_query_heads=query_heads,
        num_key_value_heads=key_value_heads,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=head_dim,
    )
    model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    if lora:
        backbone.enable_lora(rank=2)
    numpy_weights(model, seed)
    return model
