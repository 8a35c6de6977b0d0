"""The one table of the wrappers the tests train with: every method once,
with the settings the tests start from. A test names a method and passes
the settings it is about (`sam_every=3`, `noise_scale=True`, ...)."""

import keras_sam

WRAPPERS = {
    "sam": (keras_sam.SAMModel, dict(rho=0.1)),
    "asam": (keras_sam.SAMModel, dict(rho=0.5, adaptive=True)),
    "tf_keras_sam": (keras_sam.SharpnessAwareMinimization, dict(rho=0.1)),
    "gsam": (keras_sam.GSAMModel, dict(rho=0.1, alpha=0.3)),
    "looksam": (keras_sam.LookSAMModel, dict(rho=0.1, sam_every=3)),
    "aesam": (keras_sam.AESAMModel, dict(rho=0.1, threshold=0.0)),
    "msam": (keras_sam.MSAMModel, dict(rho=0.3)),
    "mesa": (
        keras_sam.MESAModel,
        dict(kl_weight=0.8, temperature=2.0, ema_decay=0.6, kl_start_epoch=0),
    ),
    "rwp": (keras_sam.RWPModel, dict(rho=0.05, seed=1)),
    "flat_lora": (keras_sam.FlatLoRAModel, dict(rho=0.05, seed=1)),
}


def wrap(name, model, **settings):
    """`WRAPPERS[name]` around `model`, `settings` over the table's."""
    cls, defaults = WRAPPERS[name]
    return cls(model, **{**defaults, **settings})
