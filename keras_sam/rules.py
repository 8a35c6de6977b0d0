"""The math of SAM, ASAM and GSAM: small pure functions on lists of tensors.

Nothing here knows about models, optimizers or backends; every function takes
and returns lists of tensors (one per trainable variable) and uses `keras.ops`
only, so it runs unchanged on TensorFlow, JAX and PyTorch.

One SAM-family step is

    g   = grad f_B(w)                                  (clean gradient)
    e   = sam_perturbation(g, rho)                     (or asam_perturbation)
    g_p = grad f_B(w + e)                              (same batch)
    d   = g_p                                          (SAM / ASAM)
    d   = gsam_descent(g, g_p, alpha)                  (GSAM)
    optimizer.apply(d) at w

Momentum-SAM takes one gradient, at `w + msam_perturbation(v, rho)` with the
optimizer's momentum `v`; MESA adds `mesa_kl` against an EMA teacher.

Norms are ONE global L2 norm over all variables together, never per variable.
"""

from keras import ops

EPSILON = 1e-12
"""Protects the divisions against a zero gradient; too small to change any
non-degenerate result."""


def dot(xs, ys):
    """Global inner product `sum_i <xs_i, ys_i>` of two lists of tensors."""
    return ops.sum(ops.stack([ops.sum(x * y) for x, y in zip(xs, ys)]))


def global_norm(tensors):
    """One L2 norm over all tensors of the list together."""
    return ops.sqrt(dot(tensors, tensors))


def sam_perturbation(grads, rho):
    """SAM's ascent step `e = rho * g / ||g||`.

    Args:
        grads: list of gradient tensors `g`.
        rho: radius of the neighbourhood (float or scalar tensor).

    Returns:
        The list of perturbations `e`, with `||e|| = rho`.
    """
    scale = rho / (global_norm(grads) + EPSILON)
    return [g * ops.cast(scale, g.dtype) for g in grads]


def msam_perturbation(momentum, rho):
    """Momentum-SAM's step `e = -rho * v / ||v||` along the negative momentum.

    Args:
        momentum: list of the optimizer's momentum buffers `v`, pointing
            along the gradient (PyTorch's `v <- mu v + g`).
        rho: the step length.

    Returns:
        The list of perturbations `e` (zeros while `v = 0`, at the first step).
    """
    return [-e for e in sam_perturbation(momentum, rho)]


def asam_scale(weights, eta, scaled):
    """ASAM's elementwise operator `T_w = |w| + eta` (1 where not `scaled`).

    Args:
        weights: list of weight tensors `w`.
        eta: the offset `eta >= 0`.
        scaled: list of booleans, which variables get `|w| + eta`.

    Returns:
        A list of tensors (or the Python float 1.0 for unscaled variables).
    """
    return [ops.abs(w) + eta if s else 1.0 for w, s in zip(weights, scaled)]


def asam_perturbation(grads, weights, rho, eta, scaled):
    """Adaptive SAM's ascent step `e = rho * T_w^2 g / ||T_w g||`.

    Args:
        grads: list of gradient tensors `g`.
        weights: list of the current weights `w`, matching `grads`.
        rho: radius (ASAM typically needs ~10x SAM's).
        eta: offset in `T_w = |w| + eta`.
        scaled: list of booleans, which variables are scaled by `T_w`.

    Returns:
        The list of perturbations `e`.
    """
    t = asam_scale(weights, eta, scaled)
    tg = [ti * g for ti, g in zip(t, grads)]
    scale = rho / (global_norm(tg) + EPSILON)
    return [ti * x * ops.cast(scale, x.dtype) for ti, x in zip(t, tg)]


def gsam_descent(grads, perturbed_grads, alpha):
    """GSAM's descent direction `d = g_p - alpha * g_perp`.

    `g_perp` is the component of the clean gradient `g` orthogonal to the
    perturbed gradient `g_p`:
    `g_perp = g - (<g, g_p> / ||g_p||^2) g_p`. With `alpha = 0` this is SAM's
    `g_p` exactly.

    Args:
        grads: clean gradients `g`.
        perturbed_grads: gradients `g_p` at `w + e`.
        alpha: weight of the orthogonal correction.

    Returns:
        The list of descent gradients `d`.
    """
    if isinstance(alpha, (int, float)) and alpha == 0:
        return list(perturbed_grads)
    coef = dot(grads, perturbed_grads) / (dot(perturbed_grads, perturbed_grads) + EPSILON)
    return [
        gp - ops.cast(alpha, gp.dtype) * (g - ops.cast(coef, gp.dtype) * gp)
        for g, gp in zip(grads, perturbed_grads)
    ]


def gsam_rho(learning_rate, rho_max, rho_min, lr_max, lr_min):
    """GSAM's radius tied to the learning rate.

    `rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min)`,
    `rho_max` when `lr_max == lr_min`, and clipped into `[rho_min, rho_max]` so a
    warmup below `lr_min` never drives it below `rho_min`.

    Args:
        learning_rate: the optimizer's ACTUAL learning rate at this step.
        rho_max, rho_min: the radius at `lr_max` and at `lr_min`.
        lr_max, lr_min: the largest and smallest learning rate of the schedule.

    Returns:
        A scalar tensor.
    """
    lr = ops.cast(learning_rate, "float32")
    if lr_max == lr_min or rho_max == rho_min:
        return ops.convert_to_tensor(rho_max, "float32")
    rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
    return ops.clip(rho, rho_min, rho_max)


def all_finite(tensors):
    """True (a boolean scalar tensor) when no tensor holds an inf or NaN."""
    return ops.all(ops.stack([ops.all(ops.isfinite(t)) for t in tensors]))


def looksam_direction(grads, perturbed_grads):
    """LookSAM's stored direction `g_v`: the part of `g_p` orthogonal to `g`,
    `g_v = g_p - (<g_p, g> / ||g||^2) g`."""
    coef = dot(perturbed_grads, grads) / (dot(grads, grads) + EPSILON)
    return [gp - ops.cast(coef, gp.dtype) * g for g, gp in zip(grads, perturbed_grads)]


def looksam_reuse(grads, direction, alpha):
    """LookSAM's descent between refreshes: `g + alpha (||g|| / ||g_v||) g_v`."""
    scale = alpha * global_norm(grads) / (global_norm(direction) + EPSILON)
    return [g + ops.cast(scale, g.dtype) * v for g, v in zip(grads, direction)]


def aesam_decision(squared_norm, mean, variance, decay, threshold):
    """AE-SAM's rule: update the moving mean and variance of `||g||^2`, then
    take a SAM step when `||g||^2 >= mean + threshold * sqrt(variance)`.

    Returns:
        `(mean, variance, do_sam)` with the updated moments.
    """
    mean = decay * mean + (1 - decay) * squared_norm
    variance = decay * variance + (1 - decay) * ops.square(squared_norm - mean)
    return mean, variance, squared_norm >= mean + threshold * ops.sqrt(variance)


def mesa_kl(student_logits, teacher_logits, temperature):
    """MESA's distillation term `tau^2 KL(p_teacher || p_student)`.

    `p = softmax(logits / tau)` over the last axis for both; the KL is summed
    over classes and averaged over the batch (and any other axes), then
    multiplied by `tau^2`, as in the official SAF / MESA code. The teacher's
    logits carry no gradient.

    Args:
        student_logits: the trained model's logits, `(batch, ..., classes)`.
        teacher_logits: the teacher's logits, same shape.
        temperature: `tau > 0`.

    Returns:
        A scalar tensor.
    """
    teacher = ops.stop_gradient(ops.cast(teacher_logits, "float32")) / temperature
    student = ops.cast(student_logits, "float32") / temperature
    log_p_teacher = ops.log_softmax(teacher, axis=-1)
    log_p_student = ops.log_softmax(student, axis=-1)
    kl = ops.sum(ops.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    return ops.mean(kl) * temperature**2


def ema_update(average, value, decay):
    """One step of an exponential moving average, `decay * a + (1 - decay) v`."""
    return [decay * a + (1 - decay) * v for a, v in zip(average, value)]


def noise_scale_terms(small_squared_norm, large_squared_norm, small_batch, large_batch):
    """Unbiased estimates of `|G|^2` and `tr(Sigma)` from gradients of two batch sizes.

    McCandlish, Kaplan, Amodei et al. (2018), "An Empirical Model of
    Large-Batch Training", appendix A: with `|G_b|^2` the squared norm of a
    gradient averaged over `b` examples drawn independently,
    `E|G_b|^2 = |G|^2 + tr(Sigma) / b`, so two sizes `b < B` give

        |G|^2    ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
        tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1 / b - 1 / B)

    Each estimate is unbiased but noisy; average each over steps (e.g. with
    `ema_update`) before taking the ratio `noise_scale = tr(Sigma) / |G|^2`
    (the "simple" noise scale `B_simple`, the batch size beyond which a larger
    batch stops cutting the steps needed in proportion).

    Args:
        small_squared_norm: `|G_b|^2`, a scalar tensor (for several small
            batches, their mean).
        large_squared_norm: `|G_B|^2`, a scalar tensor.
        small_batch, large_batch: the batch sizes `b < B`, numbers or
            scalar tensors (checked when they are numbers).

    Returns:
        `(squared_gradient_norm, trace)`: the two estimates, scalar tensors.
    """
    b, big = small_batch, large_batch
    if isinstance(b, (int, float)) and isinstance(big, (int, float)):
        b, big = float(b), float(big)
        if not 0 < b < big:
            raise ValueError(
                f"`small_batch` must be > 0 and below `large_batch`; got {small_batch!r} "
                f"and {large_batch!r}."
            )
    squared = (big * large_squared_norm - b * small_squared_norm) / (big - b)
    trace = (small_squared_norm - large_squared_norm) / (1.0 / b - 1.0 / big)
    return squared, trace


def noise_scale(average_squared_norm, average_trace):
    """The simple noise scale `B_simple = tr(Sigma) / |G|^2` from averages of
    the `noise_scale_terms` estimates; `inf` while the averaged `|G|^2` is not
    positive (the measured gradient is all noise)."""
    positive = ops.greater(average_squared_norm, 0)
    safe = ops.where(positive, average_squared_norm, 1.0)
    return ops.where(positive, average_trace / safe, float("inf"))


def filter_norms(weight, axis=-1):
    """L2 norm of each slice of `weight` along `axis` (its "filters"), over
    all other axes, kept as broadcastable dimensions; one norm over the
    whole tensor for a 1-D `weight`."""
    if len(weight.shape) <= 1:
        return ops.sqrt(ops.sum(ops.square(weight)))
    axis = axis % len(weight.shape)
    others = tuple(i for i in range(len(weight.shape)) if i != axis)
    return ops.sqrt(ops.sum(ops.square(weight), axis=others, keepdims=True))


def rwp_noise(standard_normals, weights, rho, axes):
    """RWP's filter-wise Gaussian noise `n = rho * ||filter|| * z`.

    Li et al., "Revisiting Random Weight Perturbation for Efficiently
    Improving Generalization" (TMLR 2024), official code nblt/mARWP: every
    filter (one output unit's slice) gets noise of standard deviation `rho`
    times its own norm; a 1-D weight (bias, normalization) `rho` times the
    norm of the whole vector. The standard deviation carries no gradient.

    Args:
        standard_normals: list of standard normal tensors `z`, one per weight.
        weights: list of weight tensors `w`.
        rho: the relative standard deviation (float or scalar tensor).
        axes: list, the filter axis of each weight (see `filter_norms`).

    Returns:
        The list of noise tensors `n`.
    """
    noise = []
    for z, w, axis in zip(standard_normals, weights, axes):
        std = ops.stop_gradient(ops.cast(rho, w.dtype) * filter_norms(w, axis))
        noise.append(std * ops.cast(z, w.dtype))
    return noise


def flat_lora_noise(standard_normal, merged_kernel, rho):
    """Flat-LoRA's noise on one merged weight `W' = W + s B A`.

    Li et al., "Flat-LoRA: Low-Rank Adaptation over a Flat Loss Landscape"
    (ICML 2025), official code nblt/Flat-LoRA: each output unit's weights
    get noise of standard deviation `rho / sqrt(n) * ||row||`, with `n` the
    row's input size, so that the noise's effect on that unit's output does
    not grow with `n`. Keras keeps kernels as `(inputs..., outputs)`: a row
    of the PyTorch weight is a slice along the LAST axis here, and `n` is
    the product of the other axes. The standard deviation carries no
    gradient.

    Args:
        standard_normal: a standard normal tensor `z`, the kernel's shape.
        merged_kernel: `W + s B A`, the kernel the forward pass uses.
        rho: the radius at this step (Flat-LoRA's `factor * rho`).

    Returns:
        The noise tensor.
    """
    fan_in = 1
    for size in merged_kernel.shape[:-1]:
        fan_in *= int(size)
    scale = ops.cast(rho, merged_kernel.dtype) / (fan_in**0.5)
    std = ops.stop_gradient(scale * filter_norms(merged_kernel, -1))
    return std * ops.cast(standard_normal, merged_kernel.dtype)


def cosine_ramp(step, ramp_steps):
    """Flat-LoRA's noise factor `(1 - cos(pi * min(step / ramp_steps, 1))) / 2`,
    rising from 0 at step 0 to 1 at `ramp_steps` and after."""
    progress = ops.minimum(ops.cast(step, "float32") / float(ramp_steps), 1.0)
    return (1.0 - ops.cos(3.141592653589793 * progress)) / 2.0


def mixed_gradient(clean_grads, noisy_grads, clean_weight):
    """m-RWP's descent `(1 - c) * g(w + n) + c * g(w)` for a clean weight `c`."""
    return [
        ops.cast(1 - clean_weight, n.dtype) * n + ops.cast(clean_weight, g.dtype) * g
        for g, n in zip(clean_grads, noisy_grads)
    ]
