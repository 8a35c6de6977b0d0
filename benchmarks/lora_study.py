"""Does sharpness-aware LoRA fine-tuning help? A small study that runs offline.

Pretrain the MNIST-1D MLP (3 x Dense(256)) on classes 0-4, then fine-tune on
classes 5-9 with LoRA on its hidden Dense layers and a new 5-class head
(trained in full), with AdamW, SAM-LoRA, GSAM-LoRA and Flat-LoRA; five seeds
(the seed changes the pretraining's initialization and both data orders).
For each run: test error on classes 5-9 and worst-case sharpness (L-inf
Auto-PGD, as `benchmarks.paper`) of the fine-tuned model in the FULL weight
space (the LoRA products merged into the kernels, every weight perturbed:
the space Flat-LoRA aims at) and in the space that trained (LoRA matrices
and head). Each method is compared with AdamW seed by seed (paired 95%
Student-t intervals), and a verdict says whether it is flatter in the full
space without costing test error.

    python -m benchmarks.lora_study --out benchmarks/results/lora_study
"""

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import benchmarks  # noqa: E402

benchmarks.import_tensorflow_quietly()  # before Keras: no C++ start-up lines

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402
from benchmarks._results import write_json  # noqa: E402
from benchmarks.paper import verdicts  # noqa: E402

WIDTH, RANK = 256, 4
METHODS = {
    "adamw": "AdamW, LoRA",
    "sam": "SAM-LoRA",
    "gsam": "GSAM-LoRA",
    "flat_lora": "Flat-LoRA",
}
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def split(num_samples, seed=42):
    """MNIST-1D split by class: (pretraining set, fine-tuning set), each
    `((x, y), (x_test, y_test))`, the fine-tuning labels shifted to 0-4."""
    (x, y), (xt, yt) = keras_sam.datasets.mnist1d(num_samples=num_samples, seed=seed)

    def part(low):
        a, b = (y >= low) & (y < low + 5), (yt >= low) & (yt < low + 5)
        return (x[a], y[a] - low), (xt[b], yt[b] - low)

    return part(0), part(5)


def mlp(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((40, 1))
    h = keras.layers.Flatten()(inputs)
    for i in range(3):
        h = keras.layers.Dense(WIDTH, activation="relu", name=f"hidden_{i}")(h)
    return keras.Model(inputs, keras.layers.Dense(5, name="head")(h))


def pretrain(data, seed, epochs, batch):
    (x, y), _ = data
    model = mlp(seed)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=LOSS)
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0)
    return model.get_weights()


def adapted(pretrained, seed):
    """The pretrained MLP with LoRA on its hidden layers and a new head."""
    model = mlp(seed)
    model.set_weights(pretrained)
    keras.utils.set_random_seed(seed + 1000)
    head = model.get_layer("head")
    head.kernel.assign(keras.initializers.GlorotUniform(seed=seed)(head.kernel.shape))
    head.bias.assign(np.zeros(head.bias.shape, "float32"))
    for i in range(3):
        model.get_layer(f"hidden_{i}").enable_lora(RANK)
    return model


def merged(model, seed):
    """A plain copy of `model` with each LoRA product merged into its kernel."""
    plain = mlp(seed)
    for i in range(3):
        layer = model.get_layer(f"hidden_{i}")
        plain.get_layer(f"hidden_{i}").set_weights(
            [keras.ops.convert_to_numpy(layer.kernel), layer.bias.numpy()]
        )
    plain.get_layer("head").set_weights(model.get_layer("head").get_weights())
    return plain


def fine_tune(method, pretrained, data, seed, args):
    (x, y), (xt, yt) = data
    model = adapted(pretrained, seed)
    steps = int(np.ceil(len(x) / args.batch)) * args.epochs
    if method == "sam":
        wrapper = keras_sam.SAMModel(model, rho=args.rho)
    elif method == "gsam":
        wrapper = keras_sam.GSAMModel(model, rho=args.rho, alpha=0.1)
    elif method == "flat_lora":
        wrapper = keras_sam.FlatLoRAModel(model, rho=args.flat_rho, ramp_steps=steps, seed=seed)
    else:
        wrapper = model
    lr = keras_sam.schedules.CosineAnnealing(
        args.lr, args.lr / 100, epochs=args.epochs, steps_per_epoch=steps // args.epochs
    )
    wrapper.compile(optimizer=keras.optimizers.AdamW(lr, weight_decay=0.0), loss=LOSS)
    keras.utils.set_random_seed(seed + 2000)  # the same data order for every method
    history = wrapper.fit(x, y, batch_size=args.batch, epochs=args.epochs, verbose=0)
    logits = model.predict(xt, batch_size=512, verbose=0)
    n = args.sharpness_examples
    measure = dict(rho=args.sharpness_rho, iterations=args.sharpness_iterations, batch_size=n)
    full = keras_sam.sharpness.worst_case_sharpness(
        merged(model, seed), (x[:n], y[:n]), LOSS, **measure
    )
    lora = keras_sam.sharpness.worst_case_sharpness(model, (x[:n], y[:n]), LOSS, **measure)
    return dict(
        method=method,
        seed=seed,
        test_error=float(np.mean(logits.argmax(-1) != yt) * 100),
        sharpness_full=float(full),
        sharpness_trained=float(lora),
        train_loss=float(history.history["loss"][-1]),
    )


def verdict(sharp, error):
    """Flatter in the full space than AdamW (log ratio interval below 0)
    without costing test error (error interval not above 0)."""
    if sharp["ci"] is None or error["ci"] is None:
        return "not settled"
    if error["ci"][0] > 0 or sharp["ci"][0] >= 0:
        return "no"
    if sharp["ci"][1] < 0 and error["ci"][1] <= 0:
        return "yes"
    if sharp["ci"][1] < 0:
        return "flatter, test error not settled"
    return "not settled"


def summarize(runs, seeds):
    by = {m: {r["seed"]: r for r in runs if r["method"] == m} for m in METHODS}
    rows, text = [], []
    for method in METHODS:
        if not by[method]:
            continue
        values = list(by[method].values())
        row = dict(method=method, label=METHODS[method], runs=len(values))
        for key in ("test_error", "sharpness_full", "sharpness_trained"):
            xs = [v[key] for v in values]
            row[key] = (float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0)
        if method != "adamw":
            pick = lambda key, m=method: {s: r[key] for s, r in by[m].items()}  # noqa: E731
            base = lambda key: {s: r[key] for s, r in by["adamw"].items()}  # noqa: E731
            row["full_ratio"] = verdicts.paired(
                pick("sharpness_full"), base("sharpness_full"), True
            )
            row["trained_ratio"] = verdicts.paired(
                pick("sharpness_trained"), base("sharpness_trained"), True
            )
            row["error_difference"] = verdicts.paired(pick("test_error"), base("test_error"))
            full = verdicts.paired(pick("sharpness_full"), base("sharpness_full"), log=True)
            row["verdict"] = verdict(full, row["error_difference"])
        rows.append(row)

    def ratio(c):
        lo, hi = c["ratio_ci"] or (float("nan"),) * 2
        return f"{c['ratio']:.2f} [{lo:.2f}, {hi:.2f}]"

    text.append(
        "| method | runs | test error % | full-space sharpness | vs AdamW (ratio, 95% CI) "
        "| trained-space sharpness | vs AdamW (ratio, 95% CI) | test error vs AdamW, points "
        "(95% CI) | verdict |"
    )
    text.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [
            r["label"],
            str(r["runs"]),
            "{:.2f} ± {:.2f}".format(*r["test_error"]),
            "{:.3g} ± {:.2g}".format(*r["sharpness_full"]),
            ratio(r["full_ratio"]) if "full_ratio" in r else "—",
            "{:.3g} ± {:.2g}".format(*r["sharpness_trained"]),
            ratio(r["trained_ratio"]) if "trained_ratio" in r else "—",
            (
                "{:+.2f} [{:+.2f}, {:+.2f}]".format(
                    r["error_difference"]["mean_difference"], *r["error_difference"]["ci"]
                )
                if "error_difference" in r and r["error_difference"]["ci"]
                else "—"
            ),
            r.get("verdict", "—"),
        ]
        text.append("| " + " | ".join(cells) + " |")
    return rows, "\n".join(text)


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, method in enumerate(METHODS):
        mine = [r for r in runs if r["method"] == method]
        for ax, key in zip(axes, ("sharpness_full", "test_error")):
            ax.scatter([i] * len(mine), [r[key] for r in mine], label=METHODS[method])
    for ax, title in zip(axes, ("worst-case sharpness, full weight space", "test error %")):
        ax.set_xticks(range(len(METHODS)), list(METHODS.values()), rotation=20)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--pretrain-epochs", type=int, default=30)
    p.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW's peak rate (cosine by epoch)")
    p.add_argument("--rho", type=float, default=0.05, help="SAM's and GSAM's radius")
    p.add_argument("--flat-rho", type=float, default=0.05, help="Flat-LoRA's radius")
    p.add_argument("--num-samples", type=int, default=4000)
    p.add_argument("--sharpness-rho", type=float, default=2e-4)
    p.add_argument("--sharpness-iterations", type=int, default=20)
    p.add_argument("--sharpness-examples", type=int, default=1024)
    p.add_argument("--out", default=None, help="folder for results.md, runs.json, the plot")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds: comma separated integers, got {args.seeds!r}")
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    if "adamw" not in methods:
        p.error("--methods must include adamw (the baseline of every comparison)")
    for name in ("pretrain_epochs", "epochs", "batch", "num_samples", "sharpness_examples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")

    start = time.time()
    pre, fine = split(args.num_samples)
    runs, total = [], len(seeds) * len(methods)
    for seed in seeds:
        weights = pretrain(pre, seed, args.pretrain_epochs, args.batch)
        for method in methods:
            t = time.time()
            run = fine_tune(method, weights, fine, seed, args)
            runs.append(run)
            print(
                f"[{len(runs)}/{total}] {METHODS[method]} seed={seed}: test error "
                f"{run['test_error']:.2f}%, full-space sharpness {run['sharpness_full']:.4g}, "
                f"trained-space {run['sharpness_trained']:.4g}, {time.time() - t:.0f} s",
                flush=True,
            )
    rows, table = summarize(runs, seeds)
    command = "python -m benchmarks.lora_study " + " ".join(argv if argv else sys.argv[1:])
    header = [
        "# Sharpness-aware LoRA fine-tuning on MNIST-1D (`benchmarks/lora_study.py`)",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, no GPU; "
        f"Keras {keras.__version__}, backend {keras.backend.backend()}; "
        f"{len(runs)} runs in {time.time() - start:.0f} s",
        f"- protocol: MLP 3 x Dense({WIDTH}) pretrained {args.pretrain_epochs} epochs on classes "
        f"0-4 (AdamW 1e-3), fine-tuned {args.epochs} epochs on classes 5-9 with LoRA rank {RANK} "
        f"on the hidden layers and a new head, AdamW with a cosine rate {args.lr} -> "
        f"{args.lr / 100:g} by the epoch, batch {args.batch}; SAM/GSAM rho {args.rho} "
        f"(GSAM alpha 0.1), Flat-LoRA rho {args.flat_rho} with the cosine ramp over the whole "
        f"run; seeds {args.seeds}; worst-case sharpness (L-inf Auto-PGD, rho "
        f"{args.sharpness_rho}, {args.sharpness_iterations} iterations, first "
        f"{args.sharpness_examples} fine-tuning examples) of the merged model (full space) and "
        "of the LoRA model (the trained space)",
        '- verdict, "flatter than AdamW in the full weight space without costing test '
        "error\": **yes** when the full-space sharpness ratio's interval lies below 1 and "
        "the test error difference's upper end is at most 0; **no** when the ratio's "
        "interval lies at or above 1 or the error difference's lies above 0; otherwise "
        'not settled ("flatter, test error not settled" when only the error\'s interval '
        "straddles 0)",
        "",
    ]
    text = "\n".join(header) + "\n" + table + "\n\n![sharpness and test error](lora_study.png)\n"
    print("\n" + table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        record = dict(runs=runs, summary=rows, markdown=table, command=command)
        write_json(os.path.join(args.out, "runs.json"), record, indent=1)
        plot(runs, os.path.join(args.out, "lora_study.png"))
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(text)
    return rows


if __name__ == "__main__":
    main()
