"""Memory and step time of sharpness-aware LoRA fine-tuning (JAX, XLA's accounting).

A KerasHub Gemma-style causal LM from a small config (random weights) gets
LoRA adapters (`backbone.enable_lora(rank)`), and each method's compiled
training step (`jax.jit(model.train_step)`, what `fit` runs) is measured:

- memory: XLA's temporary buffers of the compiled step (`memory_analysis()`),
  per byte of trainable (LoRA) parameters and per byte of frozen parameters,
  and the state each method stores beyond the weights (AdamW's slots);
- time: the median over repeats of `--steps` calls of the compiled step,
  after a warmup, as a ratio to plain AdamW with LoRA in the same process.

Methods: AdamW with LoRA (the baseline), SAM, GSAM and Flat-LoRA on LoRA
(Flat-LoRA's noise is drawn in the step, on the merged weights of the
adapted layers), and full fine-tuning with AdamW for scale.

    KERAS_BACKEND=jax python benchmarks/fine_tuning_cost.py \
        --json benchmarks/results/fine_tuning_cost_cpu.json
"""

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import benchmarks  # noqa: E402

benchmarks.import_tensorflow_quietly()  # before Keras: no C++ start-up lines

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402
from benchmarks._results import write_json  # noqa: E402

SIZES = {
    # name: (layers, hidden, heads, vocabulary)
    "small": (2, 128, 4, 2048),
    "medium": (4, 256, 4, 4096),
}
BATCH, LENGTH, RANK = 8, 64, 8

METHODS = {
    # name: (label, LoRA or full fine-tuning, wrap(task model) -> model)
    "adamw_lora": ("AdamW, LoRA", True, lambda m: m),
    "sam_lora": ("SAM, LoRA", True, lambda m: keras_sam.SAMModel(m, rho=0.05)),
    "gsam_lora": ("GSAM, LoRA", True, lambda m: keras_sam.GSAMModel(m, rho=0.05, alpha=0.1)),
    "flat_lora": ("Flat-LoRA", True, lambda m: keras_sam.FlatLoRAModel(m, rho=0.05, seed=0)),
    "adamw_full": ("AdamW, full fine-tuning", False, lambda m: m),
}


def causal_lm(size, lora):
    import keras_hub

    layers, hidden, heads, vocabulary = SIZES[size]
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=vocabulary,
        num_layers=layers,
        num_query_heads=heads,
        num_key_value_heads=1,
        hidden_dim=hidden,
        intermediate_dim=4 * hidden,
        head_dim=hidden // heads,
    )
    model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    if lora:
        backbone.enable_lora(rank=RANK)
    return model


def nbytes(variables):
    return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables))


def data(size):
    vocabulary = SIZES[size][3]
    ids = np.random.default_rng(0).integers(1, vocabulary, size=(BATCH, LENGTH + 1))
    x = {"token_ids": ids[:, :-1].astype("int32"), "padding_mask": np.ones((BATCH, LENGTH), bool)}
    return x, ids[:, 1:].astype("int32")


def measure(name, size, steps, repeats):
    """One method at one size: memory of its compiled step and the median
    seconds per step."""
    import jax

    label, lora, wrap = METHODS[name]
    lm = causal_lm(size, lora)
    model = wrap(lm)
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data(size)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)  # builds every variable
    trainable = nbytes(lm.trainable_variables)
    frozen = nbytes(lm.non_trainable_variables)
    adapted = nbytes([layer._kernel for layer in keras_sam.models.rwp.lora_layers(lm)])
    own = [v for v in model.non_trainable_variables if all(v is not w for w in lm.weights)]
    stored = nbytes(model.optimizer.variables) + nbytes(own)

    def state():
        return (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            [v.value for v in model.optimizer.variables],
            [v.value for v in model.metrics_variables],
        )

    step = jax.jit(model.train_step, donate_argnums=0)
    compiled = step.lower(state(), (x, y)).compile()
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
    current = state()
    _, current = step(current, (x, y))  # warmup
    jax.block_until_ready(current)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            _, current = step(current, (x, y))
        jax.block_until_ready(current)
        times.append((time.perf_counter() - start) / steps)
    return dict(
        method=name,
        label=label,
        trainable_bytes=trainable,
        frozen_bytes=frozen,
        adapted_kernel_bytes=adapted,
        temp=temp,
        stored=stored,
        temp_per_trainable_byte=temp / trainable,
        temp_per_frozen_byte=temp / frozen if frozen else None,
        stored_per_trainable_byte=stored / trainable,
        seconds_per_step=float(np.median(times)),
    )


def machine():
    import jax

    return dict(
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
        device=str(jax.devices()[0].device_kind),
        keras=keras.__version__,
        jax=jax.__version__,
        batch=BATCH,
        sequence_length=LENGTH,
        lora_rank=RANK,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here (replaced only when complete)")
    args = parser.parse_args(argv)
    if keras.backend.backend() != "jax":
        parser.error("XLA's memory accounting needs KERAS_BACKEND=jax")
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1")
    if "adamw_lora" not in args.methods:
        parser.error("--methods must include adamw_lora (the baseline of the time ratios)")
    results = dict(machine(), steps=args.steps, repeats=args.repeats)
    results["sizes"] = {}
    total, done = len(args.sizes) * len(args.methods), 0
    for size in args.sizes:
        rows = []
        for name in args.methods:
            rows.append(measure(name, size, args.steps, args.repeats))
            done += 1
            print(f"[{done}/{total}] {size}: {name}", flush=True)
        base = next(r for r in rows if r["method"] == "adamw_lora")["seconds_per_step"]
        for r in rows:
            r["time_vs_adamw_lora"] = r["seconds_per_step"] / base
        layers, hidden, heads, vocabulary = SIZES[size]
        results["sizes"][size] = dict(
            layers=layers, hidden=hidden, heads=heads, vocabulary=vocabulary, rows=rows
        )
    for size, entry in results["sizes"].items():
        print(f"\n{size}: {entry['layers']} layers, hidden {entry['hidden']}")
        print(f"{'method':26s} temp/trainable temp/frozen stored/trainable time/AdamW-LoRA")
        for r in entry["rows"]:
            frozen = r["temp_per_frozen_byte"]
            print(
                f"{r['label']:26s} {r['temp_per_trainable_byte']:14.1f} "
                f"{'-' if frozen is None else f'{frozen:.2f}':>11s} "
                f"{r['stored_per_trainable_byte']:16.2f} {r['time_vs_adamw_lora']:15.2f}"
            )
    if args.json:
        write_json(args.json, results, indent=1)
    return results


if __name__ == "__main__":
    main()
