"""Runs keras_sam on the backend named by KERAS_BACKEND and writes what it got.

Used by tests/backends/test_backends.py and tests/backends/test_backends_torch.py (through
tests/support/backend_runs.py), once per setting, in a subprocess (a Keras
backend is fixed per process). Writes an .npz with, per case, the final
weights and logged values, plus the float64 NumPy oracle for a linear model.

    KERAS_BACKEND=jax python tests/support/backend_check.py OUT.npz \
        [--jit] [--data-parallel] [--core-only]
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402

N, D, BATCH, LR = 32, 4, 8, 0.1


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype("float32")
    y = rng.normal(size=(N, 1)).astype("float32")
    return x, y


def same_weights(model, seed=0):
    """Backends draw different initial weights from one seed; use NumPy's."""
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        v.assign(rng.normal(scale=0.5, size=v.shape).astype("float32"))
    return model


def linear(seed=0):
    return same_weights(keras.Sequential([keras.Input((D,)), keras.layers.Dense(1)]), seed)


def mlp(seed=0, outputs=1):
    keras.utils.set_random_seed(seed)
    return same_weights(
        keras.Sequential(
            [
                keras.Input((D,)),
                keras.layers.Dense(8, activation="tanh"),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(outputs),
            ]
        ),
        seed,
    )


def mlp_classifier(seed=0):
    """The MLP with three logits, for MESA."""
    return mlp(seed, outputs=3)


def oracle_linear_sam(w, b, x, y, rho, alpha):
    """SAM / GSAM on least squares in float64: grad = 2/n X^T (Xw + b - y)."""
    w, b = w.astype(np.float64), b.astype(np.float64)
    for start in range(0, N, BATCH):
        xb, yb = (
            x[start : start + BATCH].astype(np.float64),
            y[start : start + BATCH].astype(np.float64),
        )

        def grad(w_, b_, xb=xb, yb=yb):
            r = xb @ w_ + b_ - yb
            return 2 * xb.T @ r / len(xb), 2 * r.mean(axis=0)

        g = grad(w, b)
        norm = np.sqrt(sum(np.sum(t * t) for t in g))
        gp = grad(w + rho * g[0] / norm, b + rho * g[1] / norm)
        coef = sum(np.sum(a * c) for a, c in zip(g, gp)) / sum(np.sum(c * c) for c in gp)
        d = [c - alpha * (a - coef * c) for a, c in zip(g, gp)]
        w, b = w - LR * d[0], b - LR * d[1]
    return w, b


def fresh_dynamo(jit):
    """torch.compile: a fresh dynamo cache before each model. torch 2.13's
    dynamo, recompiling the train-step code that earlier models compiled,
    crashes while it works out why it recompiles (IndexError in guards.py,
    recompilation_reason_for_no_tensor_aliasing_guard); a process that
    trains one model is not hit."""
    if jit and keras.backend.backend() == "torch":
        import torch._dynamo

        torch._dynamo.reset()


def late_phase(x, y, jit):
    """`SAMModel(sam_start_epoch=2)` for 4 epochs, and its reference: plain
    Keras for 2 epochs, then `SAMModel` for 2 with the same optimizer. Both
    weights (BatchNorm statistics included) and optimizer state (step count,
    momentum) must be equal exactly."""

    def optimizer():
        return keras.optimizers.SGD(0.05, momentum=0.9)

    def fit(model, epochs, initial_epoch=0):
        return model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=epochs,
            initial_epoch=initial_epoch,
            shuffle=False,
            verbose=0,
        )

    fresh_dynamo(jit)
    inner = mlp()
    model = keras_sam.SAMModel(inner, rho=0.05, sam_start_epoch=2)
    model.compile(optimizer=optimizer(), loss="mse", jit_compile=jit)
    history = fit(model, 4)
    got = weights_of(inner) + weights_of_optimizer(model.optimizer)

    fresh_dynamo(jit)
    reference = mlp()
    shared = optimizer()
    reference.compile(optimizer=shared, loss="mse", jit_compile=jit)
    fit(reference, 2)
    sam = keras_sam.SAMModel(reference, rho=0.05)
    sam.compile(optimizer=shared, loss="mse", jit_compile=jit)
    fit(sam, 4, initial_epoch=2)
    expected = weights_of(reference) + weights_of_optimizer(shared)
    return {
        "late_phase": np.concatenate([t.ravel().astype(np.float64) for t in got]),
        "late_phase_reference": np.concatenate([t.ravel().astype(np.float64) for t in expected]),
        # Keras' own step in the plain epochs: no gradient norm measured.
        "late_phase_grad_norm": np.array(history.history["grad_norm"]),
        "late_phase_sam_fraction": np.array(history.history["sam_fraction"]),
    }


def weights_of_optimizer(optimizer):
    return [np.asarray(keras.ops.convert_to_numpy(v)) for v in optimizer.variables]


def weights_of(model):
    return [np.asarray(keras.ops.convert_to_numpy(v)) for v in model.weights]


def random_perturbation(x, y, jit):
    """RWP (all weights) and Flat-LoRA (a LoRA layer's merged weight) on
    least squares, against float64 replays that use this backend's own
    noise draws (`standard_normals(step)`): the formulas of the official
    code, the gradient `2/n X^T r` at the noisy point, SGD."""
    n64 = lambda t: np.asarray(keras.ops.convert_to_numpy(t), np.float64)  # noqa: E731
    results = {}

    fresh_dynamo(jit)
    inner = linear()
    model = keras_sam.RWPModel(inner, rho=0.2, seed=3)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", jit_compile=jit)
    w, b = (t.astype(np.float64) for t in weights_of(inner))
    for step, s in enumerate(range(0, N, BATCH)):
        xb, yb = x[s : s + BATCH].astype(np.float64), y[s : s + BATCH]
        zw, zb = (n64(t) for t in model.standard_normals(step))
        wn = w + 0.2 * np.linalg.norm(w, axis=0, keepdims=True) * zw  # per output unit
        bn = b + 0.2 * np.linalg.norm(b) * zb
        r = xb @ wn + bn - yb
        w, b = w - LR * 2 * xb.T @ r / len(xb), b - LR * 2 * r.mean(axis=0)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    results["rwp"] = np.concatenate([t.ravel() for t in weights_of(inner)])
    results["rwp_oracle"] = np.concatenate([w.ravel(), b.ravel()])

    fresh_dynamo(jit)
    inner = linear()
    dense = inner.layers[0]
    dense.enable_lora(2, lora_alpha=4)
    rng = np.random.default_rng(1)
    for v in (dense.lora_kernel_a, dense.lora_kernel_b):
        v.assign(rng.normal(scale=0.5, size=v.shape).astype("float32"))
    frozen = n64(dense._kernel)
    model = keras_sam.FlatLoRAModel(inner, rho=0.3, ramp_steps=2, seed=5)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", jit_compile=jit)
    a, bb, bias = (n64(v) for v in (dense.lora_kernel_a, dense.lora_kernel_b, dense.bias))
    for step, s in enumerate(range(0, N, BATCH)):
        xb, yb = x[s : s + BATCH].astype(np.float64), y[s : s + BATCH]
        factor = 0.5 * (1 - np.cos(min(step / 2, 1.0) * np.pi))
        merged = frozen + 2 * a @ bb
        std = factor * 0.3 / np.sqrt(D) * np.linalg.norm(merged, axis=0, keepdims=True)
        noisy = merged + std * n64(model.standard_normals(step)[0])
        r = xb @ noisy + bias - yb
        g = 2 * xb.T @ r / len(xb)
        a, bb, bias = a - LR * 2 * g @ bb.T, bb - LR * 2 * a.T @ g, bias - LR * 2 * r.mean(axis=0)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    trained = (dense.lora_kernel_a, dense.lora_kernel_b, dense.bias)
    results["flat_lora"] = np.concatenate([n64(v).ravel() for v in trained])
    results["flat_lora_oracle"] = np.concatenate([a.ravel(), bb.ravel(), bias.ravel()])
    results["flat_lora_frozen_changed"] = np.array(np.any(n64(dense._kernel) != frozen))
    return results


def main(out, jit, data_parallel=False, core_only=False):
    if data_parallel:  # JAX: shard every batch over the (forced host) devices
        devices = keras.distribution.list_devices("cpu")
        assert len(devices) > 1, devices
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    x, y = data()
    results = {}

    # 1. Closed-form oracle on a linear model (SAM and GSAM).
    for name, alpha in (("sam", 0.0), ("gsam", 0.5)):
        inner = linear()
        w0, b0 = weights_of(inner)
        # Under DataParallel: the global perturbation, which the oracle computes.
        model = (
            keras_sam.GSAMModel(inner, rho=0.1, alpha=alpha, sync_perturbation=data_parallel)
            if alpha
            else keras_sam.SAMModel(inner, rho=0.1, sync_perturbation=data_parallel)
        )
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", jit_compile=jit)
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        results[f"linear_{name}"] = np.concatenate([t.ravel() for t in weights_of(inner)])
        w, b = oracle_linear_sam(w0, b0, x, y, rho=0.1, alpha=alpha)
        results[f"linear_{name}_oracle"] = np.concatenate([w.ravel(), b.ravel()])

    # 2. The same MLP with BatchNorm trained by SAM, ASAM and GSAM with a
    #    keras_sam schedule (rho follows the lr); compared across backends.
    steps = N // BATCH
    cases = {
        "mlp_sam": lambda m: keras_sam.SAMModel(m, rho=0.05),
        "mlp_asam": lambda m: keras_sam.SAMModel(m, rho=0.5, adaptive=True),
        "mlp_gsam": lambda m: keras_sam.GSAMModel(m, rho=0.1, alpha=0.3, rho_min=0.01),
        "mlp_split": lambda m: keras_sam.SharpnessAwareMinimization(
            m, rho=0.05, num_batch_splits=2
        ),
    }
    # Cheaper schedules of the second gradient: the choice of step happens in
    # the compiled step (several steps per execution where the backend can).
    cheaper = {
        "mlp_every": lambda m: keras_sam.SAMModel(m, rho=0.05, sam_every=3),
        "mlp_looksam": lambda m: keras_sam.LookSAMModel(m, rho=0.05, sam_every=3, alpha=0.7),
        "mlp_aesam": lambda m: keras_sam.AESAMModel(m, rho=0.05, threshold=0.0),
        # One gradient per step: along the momentum, and (below, on a
        # classifier) MESA's distillation from the moving average.
        "mlp_msam": lambda m: keras_sam.MSAMModel(m, rho=0.3),
    }
    # The same schedules one step per call: each step's kind chosen on the
    # host, one compiled function per kind (no conditional in the step).
    host_chosen = {
        "mlp_every_host": cheaper["mlp_every"],
        "mlp_looksam_host": cheaper["mlp_looksam"],
        "mlp_late": lambda m: keras_sam.SAMModel(m, rho=0.05, sam_every=2, sam_start_epoch=1),
    }
    cases.update(cheaper)
    cases.update(host_chosen)
    if core_only:  # torch.compile takes minutes per model on a CPU
        cases = {
            "mlp_gsam": cases["mlp_gsam"],
            "mlp_aesam": cases["mlp_aesam"],
            "mlp_late": cases["mlp_late"],
        }
    for name, wrap in cases.items():
        fresh_dynamo(jit)
        inner = mlp()
        model = wrap(inner)
        if data_parallel:  # the global perturbation: comparable with one device
            model.sync_perturbation = True
        lr = keras_sam.schedules.CosineAnnealing(0.1, 0.001, epochs=2, steps_per_epoch=steps)
        per_execution = 2 if name in cheaper and keras.backend.backend() != "torch" else 1
        per_execution = 1 if name in host_chosen else per_execution
        momentum = 0.9 if name == "mlp_msam" else 0.0
        model.compile(
            optimizer=keras.optimizers.SGD(lr, momentum=momentum),
            loss="mse",
            jit_compile=jit,
            steps_per_execution=per_execution,
        )
        history = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        results[name] = np.concatenate([t.ravel() for t in weights_of(inner)])
        results[name + "_logs"] = np.array(
            [
                history.history[k][-1]
                for k in ("loss", "sharpness", "grad_norm", "rho")
                if k in history.history
            ]  # MSAM logs no sharpness
        )

    # MESA on a classifier with BatchNorm: the teacher, its average and the
    # epoch at which the term switches on.
    labels = np.abs(y[:, 0] * 3).astype("int64") % 3
    fresh_dynamo(jit)
    inner = mlp_classifier()
    model = keras_sam.MESAModel(
        inner, kl_weight=0.8, temperature=2.0, ema_decay=0.5, kl_start_epoch=0
    )
    if data_parallel:
        model.sync_perturbation = True  # the global batch's BatchNorm statistics
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        jit_compile=jit,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, labels, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    results["cls_mesa"] = np.concatenate(
        [t.ravel() for t in weights_of(inner)] + [t.ravel() for t in model.ema_weights()]
    )
    results["cls_mesa_logs"] = np.array(
        [history.history[k][-1] for k in ("loss", "kl", "grad_norm")]
    )

    results.update(late_phase(x, y, jit))
    if core_only:
        np.savez(out, **results)
        return

    results.update(random_perturbation(x, y, jit))

    # 3. Measures on the trained linear model.
    inner = linear()
    results["full_gradient_norm"] = np.array(
        keras_sam.sharpness.full_gradient_norm(inner, (x, y), "mse", batch_size=BATCH)
    )
    w, b = (t.astype(np.float64) for t in weights_of(inner))
    r = x @ w + b - y
    results["full_gradient_norm_oracle"] = np.array(
        np.sqrt(np.sum((2 * x.T @ r / N) ** 2) + np.sum((2 * r.mean(axis=0)) ** 2))
    )
    design = np.concatenate([x, np.ones((N, 1), np.float32)], axis=1).astype(np.float64)
    results["hessian_max_eigenvalue"] = np.array(
        keras_sam.sharpness.hessian_max_eigenvalue(
            inner, (x, y), "mse", iterations=100, tol=1e-9, batch_size=BATCH
        )
    )
    results["hessian_max_eigenvalue_oracle"] = np.array(
        np.linalg.eigvalsh(2 * design.T @ design / N).max()
    )
    results["worst_case_sharpness"] = np.array(
        keras_sam.sharpness.worst_case_sharpness(inner, (x, y), "mse", rho=0.01, batch_size=BATCH)
    )

    # 4. BatchSizeScheduler: exact steps per epoch inside one fit.
    import tensorflow as tf

    def dataset_fn(batch):
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)

    seen = []

    class Count(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append(0)

        def on_train_batch_end(self, batch, logs=None):
            seen[-1] += 1

    model = keras_sam.SAMModel(mlp(), rho=0.05)
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit)
    scheduler = keras_sam.callbacks.BatchSizeScheduler({0: 4, 1: 8, 2: 16}, dataset_fn)
    history = model.fit(dataset_fn(4), epochs=3, callbacks=[scheduler, Count()], verbose=0)
    results["scheduler_steps"] = np.array(seen)
    results["scheduler_batch_sizes"] = np.array(history.history["batch_size"])
    results["scheduler_iterations"] = np.array(
        int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    )

    # BatchSizeOnPlateau: the batch sizes follow the rule replayed on the
    # run's own losses (a large min_delta: the loss stalls within epochs).
    policy = keras_sam.callbacks.BatchSizeOnPlateau(
        4, patience=1, min_delta=0.05, max_batch_size=16
    )
    model = keras_sam.SAMModel(mlp(), rho=0.05)
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit)
    scheduler = keras_sam.callbacks.BatchSizeScheduler(policy, dataset_fn)
    seen.clear()
    history = model.fit(dataset_fn(4), epochs=6, callbacks=[scheduler, Count()], verbose=0)
    replay = keras_sam.callbacks.BatchSizeOnPlateau(
        4, patience=1, min_delta=0.05, max_batch_size=16
    )
    expected = [4] + [
        replay.decide_from_logs(e, {"loss": v}) for e, v in enumerate(history.history["loss"][:-1])
    ]
    results["plateau_batch_sizes"] = np.array(history.history["batch_size"])
    results["plateau_expected"] = np.array(expected)
    results["plateau_steps"] = np.array(seen)
    np.savez(out, **results)


if __name__ == "__main__":
    main(
        sys.argv[1],
        jit="--jit" in sys.argv,
        data_parallel="--data-parallel" in sys.argv,
        core_only="--core-only" in sys.argv,
    )
