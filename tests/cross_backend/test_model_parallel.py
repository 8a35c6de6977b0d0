"""Sharpness-aware fine-tuning under JAX `keras.distribution.ModelParallel`:
a KerasHub Gemma with LoRA, its weights laid out by the backbone's own
`get_layout_map` over 8 forced host devices (mesh 2 x 4, batch x model),
trained by SAM and GSAM (synced perturbation), SAM every 2 steps and
Flat-LoRA, equals the same training on one device. The default per-replica
perturbation works where the batch axis has one device (mesh 1 x 8) and is
refused with a clear error where it has more (tests/support/model_parallel_check.py).
"""

import importlib.util

import pytest
from forced_devices import with_host_devices
from other_backends import last_json_line
from other_backends import subprocess_env

from keras_sam import _keras_compat

if _keras_compat.keras_version() < (3, 15):
    pytest.skip("keras-hub 0.32 needs Keras >= 3.15", allow_module_level=True)
for needed in ("jax", "keras_hub"):
    if importlib.util.find_spec(needed) is None:
        pytest.skip(f"{needed} is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def result():
    return last_json_line("model_parallel_check.py", with_host_devices(subprocess_env("jax"), 8))


@pytest.mark.parametrize(
    "case", ["sam_synced", "gsam_synced", "sam_every2_synced", "flat_lora", "sam_per_replica"]
)
def test_the_sharded_run_equals_one_device(result, case):
    got = result[case]
    assert got["sharded"] > 0  # the layout map really sharded weights
    assert not got["frozen_changed"]  # LoRA's frozen weights: bitwise equal
    # Three AdamW steps; the mesh sums in another order (float32 rounding,
    # which Adam's per-coordinate scaling enlarges).
    assert got["max_abs_diff"] <= 5e-6 * max(1.0, got["max_abs"]), got


def test_per_replica_perturbation_over_a_split_batch_is_refused(result):
    message = result["refused"]
    assert message is not None and "sync_perturbation=True" in message
    assert "ModelParallel" in message
