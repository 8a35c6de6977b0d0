"""A small KerasHub Gemma with LoRA fine-tuned on JAX: one device against a
`keras.distribution.ModelParallel` mesh laid out by the backbone's own
`get_layout_map`, over 8 forced host devices. Used by
tests/cross_backend/test_model_parallel.py in a subprocess; prints one JSON line.

    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/support/model_parallel_check.py
"""

import contextlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
from tiny_gemma import gemma_causal_lm  # noqa: E402

import keras_sam  # noqa: E402

VOCAB, LENGTH, BATCH = 64, 8, 8
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data():
    ids = np.random.default_rng(0).integers(1, VOCAB, size=(BATCH, LENGTH + 1)).astype("int32")
    return {"token_ids": ids[:, :-1], "padding_mask": np.ones((BATCH, LENGTH), "int32")}, ids[:, 1:]


def gemma():
    # Sizes divisible by the mesh axes that the layout map shards them on.
    return gemma_causal_lm(VOCAB, lora=True, query_heads=8, key_value_heads=8, head_dim=2)


CASES = {
    "sam_synced": lambda m: keras_sam.SAMModel(m, rho=0.05, sync_perturbation=True),
    "gsam_synced": lambda m: keras_sam.GSAMModel(m, rho=0.05, alpha=0.3, sync_perturbation=True),
    "sam_every2_synced": lambda m: keras_sam.SAMModel(
        m, rho=0.05, sam_every=2, sync_perturbation=True
    ),
    "flat_lora": lambda m: keras_sam.FlatLoRAModel(m, rho=0.3, seed=2),
    # The default, per replica: allowed where the batch axis has one device.
    "sam_per_replica": lambda m: keras_sam.SAMModel(m, rho=0.05),
}


def train(name, distribution):
    x, y = data()
    with distribution.scope() if distribution else contextlib.nullcontext():
        lm = gemma()
        frozen = [np.array(v.value) for v in lm.non_trainable_variables]
        model = CASES[name](lm)
        model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss=LOSS)
        model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    changed = any(
        not np.array_equal(np.array(v.value), f) for v, f in zip(lm.non_trainable_variables, frozen)
    )
    sharded = sorted(
        {v.path for v in lm.weights if len(v.value.sharding.device_set) > 1} if distribution else []
    )
    return [np.array(v.value, np.float64) for v in lm.trainable_variables], changed, sharded


def mesh_distribution(shape):
    devices = keras.distribution.list_devices("cpu")
    mesh = keras.distribution.DeviceMesh(shape, ("batch", "model"), devices=devices)
    layout = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    return keras.distribution.ModelParallel(layout_map=layout, batch_dim_name="batch")


def main():
    assert len(keras.distribution.list_devices("cpu")) == 8
    out = {}
    for name in CASES:
        shape = (1, 8) if name == "sam_per_replica" else (2, 4)
        one, _, _ = train(name, None)
        got, changed, sharded = train(name, mesh_distribution(shape))
        out[name] = {
            "max_abs_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(one, got)),
            "max_abs": max(float(np.max(np.abs(a))) for a in one),
            "frozen_changed": changed,
            "sharded": len(sharded),
        }
    try:
        train("sam_per_replica", mesh_distribution((2, 4)))
        out["refused"] = None
    except ValueError as error:
        out["refused"] = str(error)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
