"""Fine-tune a KerasHub causal LM with LoRA and SAM, GSAM or Flat-LoRA.

The task model's backbone gets LoRA adapters (`backbone.enable_lora(rank)`:
the pretrained weights freeze, small `A`, `B` matrices train), the task model
is wrapped in a keras_sam model and trained with plain `fit`: AdamW with a
cosine learning rate by the epoch, `ModelCheckpoint` and `TensorBoard`
(loss, accuracy, and the method's `grad_norm`, `rho`, `sharpness`). Then the
model generates a continuation of a prompt.

With `--preset` naming a KerasHub preset whose files you have (a Kaggle or
Hugging Face handle, or a local folder), the model and its tokenizer come
from it and the data are lines of text (`--text-file`, default a small
generated text). Without it, everything runs offline in under a minute on a
CPU: a small Gemma-style model is first pretrained briefly (all weights) on
a generated token language where each sequence counts UP by its own step,
then LoRA-fine-tuned on the related task of counting DOWN. The script prints
the held-out next-token accuracy on counting down before fine-tuning (the
pretrained model counts up: near 0) and after (near 1), and a generated
continuation of a held-out prompt next to the right one.

    pip install ".[examples,hub]"      # from the repository root
    python examples/fine_tune_lora.py --method flat_lora --epochs 4
    python examples/fine_tune_lora.py --preset gemma_1.1_instruct_2b_en --method sam
    tensorboard --logdir fine_tune_lora_out/logs
"""

import argparse
import os

from _quiet import import_tensorflow_quietly  # examples/_quiet.py

import_tensorflow_quietly()

import keras
import numpy as np
import tensorflow as tf

import keras_sam

METHODS = ("adamw", "sam", "gsam", "flat_lora")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="a KerasHub CausalLM preset (default: none)")
    p.add_argument("--text-file", default=None, help="with --preset: one training text per line")
    p.add_argument("--method", choices=METHODS, default="flat_lora")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--rho", type=float, default=None, help="default 0.05 (Flat-LoRA 0.05)")
    p.add_argument("--alpha", type=float, default=0.1, help="GSAM's alpha")
    p.add_argument("--learning-rate", type=float, default=3e-2)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--examples", type=int, default=1024, help="training sequences")
    p.add_argument("--sequence-length", type=int, default=12)
    p.add_argument(
        "--pretrain-epochs",
        type=int,
        default=4,
        help="without --preset: epochs of pretraining on counting up (2048 sequences)",
    )
    p.add_argument(
        "--size",
        type=int,
        nargs=3,
        metavar=("LAYERS", "HIDDEN", "HEADS"),
        default=(2, 64, 4),
        help="without --preset: the small model's layers, hidden size and heads",
    )
    p.add_argument("--out", default="fine_tune_lora_out")
    p.add_argument("--seed", type=int, default=0)
    return p


def check_args(args):
    """Refuse bad values before anything is built."""
    for name in ("rank", "epochs", "batch_size", "examples", "sequence_length", "pretrain_epochs"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.rho is not None and args.rho < 0:
        raise SystemExit(f"--rho must be >= 0, got {args.rho}")
    if args.text_file and not args.preset:
        raise SystemExit("--text-file needs --preset (the small model has no tokenizer)")
    if not args.preset and args.sequence_length < PROMPT + 2:
        raise SystemExit(
            f"--sequence-length must be >= {PROMPT + 2} without --preset (a prompt of "
            f"{PROMPT} tokens and its continuation), got {args.sequence_length}"
        )
    if args.text_file and not os.path.isfile(args.text_file):
        raise SystemExit(f"--text-file {args.text_file!r} does not exist")
    layers, hidden, heads = args.size
    if min(layers, hidden, heads) < 1 or hidden % heads:
        raise SystemExit(f"--size: positive, HIDDEN divisible by HEADS; got {args.size}")


VOCABULARY = 32
"""Token 0 is padding; the counting languages use tokens 1 to 31."""

PROMPT = 4
"""Tokens of the generation prompt."""


def counting_language(n, length, seed, direction=1):
    """Token sequences that count up (`direction=1`) or down (-1) from a
    random start by a random step of 1 or 2, modulo the 31 tokens: `(x, y)`
    for next-token prediction."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, VOCABULARY - 1, size=(n, 1))
    step = rng.integers(1, 3, size=(n, 1))
    ids = 1 + (start + direction * step * np.arange(length + 1)) % (VOCABULARY - 1)
    x = {"token_ids": ids[:, :-1].astype("int32"), "padding_mask": np.ones((n, length), "int32")}
    return x, ids[:, 1:].astype("int32")


def held_out_accuracy(lm, x, y):
    """Next-token accuracy from the second target on (one token does not
    tell the step)."""
    predicted = np.asarray(lm.predict(x, batch_size=256, verbose=0)).argmax(-1)
    return float(np.mean(predicted[:, 1:] == y[:, 1:]))


def pretrain(lm, args):
    """All weights, plain AdamW, on counting up: the "pretrained" model."""
    x, y = counting_language(2048, args.sequence_length, args.seed + 100)
    lm.compile(
        optimizer=keras.optimizers.AdamW(3e-3, weight_decay=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    # shuffle=False: the sequences are drawn at random (and KerasHub passes
    # them to Keras as a tf.data pipeline, which Keras warns it cannot shuffle).
    lm.fit(x, y, batch_size=64, epochs=args.pretrain_epochs, shuffle=False, verbose=0)
    x, y = counting_language(256, args.sequence_length, args.seed + 200)
    print(f"pretrained on counting up: held-out accuracy {held_out_accuracy(lm, x, y):.2f}")


def small_model(args):
    import keras_hub

    layers, hidden, heads = args.size
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=layers,
        num_query_heads=heads,
        num_key_value_heads=1,
        hidden_dim=hidden,
        intermediate_dim=4 * hidden,
        head_dim=hidden // heads,
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def preset_data(lm, args):
    """Lines of text through the task's own preprocessor (the wrapper's `fit`
    is Keras' own and does not call it): `(x, y, sample_weight)` batches."""
    if args.text_file:
        with open(args.text_file) as f:
            lines = [line.strip() for line in f if line.strip()]
    else:
        rng = np.random.default_rng(args.seed)
        lines = [
            " ".join(str(int(a) + int(s) * i) for i in range(12))
            for a, s in zip(rng.integers(0, 50, args.examples), rng.integers(1, 5, args.examples))
        ]
    lm.preprocessor.sequence_length = args.sequence_length
    ds = tf.data.Dataset.from_tensor_slices(lines[: args.examples]).batch(args.batch_size)
    return ds.map(lm.preprocessor, num_parallel_calls=tf.data.AUTOTUNE), len(lines)


def wrap(lm, args, total_steps):
    rho = args.rho if args.rho is not None else 0.05
    if args.method == "sam":
        return keras_sam.SAMModel(lm, rho=rho)
    if args.method == "gsam":
        return keras_sam.GSAMModel(lm, rho=rho, alpha=args.alpha)
    if args.method == "flat_lora":
        return keras_sam.FlatLoRAModel(lm, rho=rho, ramp_steps=total_steps, seed=args.seed)
    return lm


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    import keras_hub

    keras.utils.set_random_seed(args.seed)
    if args.preset:
        lm = keras_hub.models.CausalLM.from_preset(args.preset)
        data, n = preset_data(lm, args)
        steps = int(np.ceil(min(n, args.examples) / args.batch_size))
        fit_data = dict(x=data)
    else:
        lm = small_model(args)
        pretrain(lm, args)
        held_out = counting_language(256, args.sequence_length, args.seed + 300, direction=-1)
        before = held_out_accuracy(lm, *held_out)
        print(f"before fine-tuning: held-out accuracy on counting down {before:.2f}")
        x, y = counting_language(args.examples, args.sequence_length, args.seed, direction=-1)
        steps = int(np.ceil(args.examples / args.batch_size))
        fit_data = dict(x=x, y=y, batch_size=args.batch_size)
    lm.backbone.enable_lora(rank=args.rank)
    trainable = sum(int(np.prod(v.shape)) for v in lm.trainable_variables)
    total = sum(int(np.prod(v.shape)) for v in lm.weights)
    print(f"LoRA rank {args.rank}: {trainable:,} of {total:,} weights train")

    model = wrap(lm, args, args.epochs * steps)
    lr = keras_sam.schedules.CosineAnnealing(
        args.learning_rate, args.learning_rate / 100, epochs=args.epochs, steps_per_epoch=steps
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(lr, weight_decay=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=["sparse_categorical_accuracy"],
    )
    os.makedirs(args.out, exist_ok=True)
    callbacks = [
        # Keras merges s A B into each kernel when it saves a LoRA layer:
        # the checkpoint is the fine-tuned model, ready to serve.
        keras.callbacks.ModelCheckpoint(
            os.path.join(args.out, "fine_tuned.weights.h5"), save_weights_only=True
        ),
        keras.callbacks.TensorBoard(os.path.join(args.out, "logs")),
    ]
    history = model.fit(**fit_data, epochs=args.epochs, callbacks=callbacks, verbose=2)

    if args.preset:
        print(lm.generate("1 2 3 4", max_length=args.sequence_length))
        return history
    lm.predict_function = None  # traced before the adapters existed
    after = held_out_accuracy(lm, *held_out)
    history.history["held_out_accuracy"] = {"before": before, "after": after}
    print(f"after fine-tuning:  held-out accuracy on counting down {after:.2f}")
    prompt = held_out[0]["token_ids"][:1]
    ids = np.zeros((1, args.sequence_length), "int32")
    ids[:, :PROMPT] = prompt[:, :PROMPT]
    mask = (ids != 0).astype("int32")
    out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
    continued = np.asarray(out["token_ids"])[0, PROMPT:].tolist()
    right = prompt[0, PROMPT:].tolist()
    history.history["continuation"] = {"generated": continued, "right": right}
    print("prompt      ", prompt[0, :PROMPT].tolist())
    print("continued   ", continued, "(right)" if continued == right else "(wrong)")
    print("right answer", right)
    return history


if __name__ == "__main__":
    main()
