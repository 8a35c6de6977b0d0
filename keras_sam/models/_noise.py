"""The gradient noise scale `B_simple = tr(Sigma) / |G|^2` (McCandlish et al.
2018), measured inside the training step from gradients the step computes
anyway: the clean gradients of its parts (sub-batches, replicas, or the two
halves of the batch) against their mean (`keras_sam.rules.noise_scale_terms`).
"""

from keras import ops
from keras import tree

from keras_sam import _validation
from keras_sam import backend as sam_backend
from keras_sam import rules
from keras_sam.models._batches import _batch_size

MEAN_REDUCTIONS = ("sum_over_batch_size", "mean")
"""Loss reductions under which a batch's gradient is the size-weighted mean
of its parts' (what the estimate compares)."""


class NoiseScale:
    """The moving averages of `|G|^2` and `tr(Sigma)` of one wrapper.

    Args:
        decay: the decay of the moving averages over steps, in `[0, 1)`.

    The averages and the count of the steps that measured are one `(3,)`
    non-trainable variable of the wrapper (`noise_scale_averages`, made by
    `build`), so checkpoints keep them.
    """

    def __init__(self, decay):
        self.decay = _validation.real(
            "noise_scale_decay", decay, low=0, high=1, high_inclusive=False
        )
        self.average = None

    def build(self, model):
        if self.average is None:
            self.average = model.add_weight(
                shape=(3,),
                dtype="float32",
                initializer="zeros",
                trainable=False,
                autocast=False,
                name="noise_scale_averages",
            )

    @staticmethod
    def check_loss(losses):
        """Raises a ValueError for a loss that is not mean-reduced."""
        for loss in [loss for loss in tree.flatten(losses) if loss is not None]:
            reduction = getattr(loss, "reduction", "sum_over_batch_size")
            if reduction not in MEAN_REDUCTIONS:
                raise ValueError(
                    f"`noise_scale=True` needs a mean-reduced loss (the gradient of a "
                    f"batch the mean of its parts'); {type(loss).__name__} has "
                    f"reduction={reduction!r}. Use reduction='sum_over_batch_size' (the "
                    "default), or noise_scale=False."
                )

    @staticmethod
    def zeros(weights):
        """The zeros of the statistics a sub-batch step sums."""
        zero = ops.zeros((), "float32")
        return dict(
            noise_small=zero, noise_inverse=zero, noise_clean=[ops.zeros_like(w) for w in weights]
        )

    @staticmethod
    def part_statistics(mode, grads, halves_stats, x, summed):
        """What one part's step contributes: `mode` is None (no estimate),
        `"step"` (the whole batch: its parts are the halves or the replicas,
        `summed("clean")` their sum) or `"part"` (a sub-batch, combined
        later)."""
        if mode is None:
            return {}
        if halves_stats is not None:
            squared, inverse = halves_stats
        else:
            squared = rules.dot(grads, grads)
            inverse = 1.0 / ops.cast(_batch_size(x), "float32")
        stats = dict(noise_small=squared, noise_inverse=inverse)
        if mode == "step":
            (global_grads,) = summed("clean") if sam_backend.num_replicas() > 1 else (grads,)
            stats.update(
                noise_large=rules.dot(global_grads, global_grads),
                noise_parts=ops.convert_to_tensor(2.0 if halves_stats is not None else 1.0),
            )
        else:
            stats.update(noise_clean=list(grads))
        return stats

    @staticmethod
    def of_sub_batches(stats, n):
        """After the sub-batch loop: the global clean gradient of the parts'
        mean, and the number of parts (every replica's sub-batches)."""
        clean = sam_backend.all_reduce(stats.pop("noise_clean"), "sum")
        stats["noise_large"] = rules.dot(clean, clean)
        return ops.cast(n, "float32") * sam_backend.num_replicas()

    @staticmethod
    def terms(stats, parts, x, loss_scale):
        """This step's estimates of `|G|^2` and `tr(Sigma)` (`noise_sq`,
        `noise_trace`, the same on every replica) from `stats["noise_small"]`,
        the replica's mean of `||g_part||^2`, `stats["noise_inverse"]`, its
        mean of `1 / part size`, and `stats["noise_large"]`, `||g||^2` of the
        global clean gradient, both norms in the step's units (the loss
        scale, each replica's loss a `1 / replicas` share). A step whose
        replicas hold batches of different sizes (a last partial batch) is
        left out on every replica alike."""
        replicas = sam_backend.num_replicas()
        unit = ops.cast(replicas, "float32") / loss_scale
        local = ops.cast(_batch_size(x), "float32")
        small, inverse, batch = sam_backend.all_reduce(
            [
                ops.cast(stats.pop("noise_small"), "float32") / replicas,
                ops.cast(stats.pop("noise_inverse"), "float32") / replicas,
                local,
            ],
            "sum",
        )
        (spread,) = sam_backend.all_reduce([ops.abs(local - batch / replicas)], "sum")
        small = small * unit**2  # each part's own mean gradient
        large = ops.cast(stats.pop("noise_large"), "float32") / loss_scale**2
        squared, trace = rules.noise_scale_terms(small, large, 1.0 / inverse, batch)
        equal = ops.less(spread, 0.5)  # integer sizes: all equal
        # Two parts at least, each of one example at least, the replicas'
        # batches of one size, finite estimates.
        valid = ops.all(
            ops.stack(
                [
                    ops.greater_equal(parts, 2.0),
                    ops.greater_equal(batch, parts),
                    equal,
                    ops.all(ops.isfinite(ops.stack([squared, trace]))),
                ]
            )
        )
        return dict(noise_sq=squared, noise_trace=trace, noise_valid=ops.cast(valid, "float32"))

    def after_step(self, model, state, new_state, stats):
        """`(new_state, logs)` of a step of `model`: the averages moved, and
        the noise scale logged."""
        index = [id(v) for v in model.non_trainable_variables].index(id(self.average))
        new_state, noise_scale = self.moved(index, state, new_state, stats)
        return new_state, {"noise_scale": noise_scale}

    def moved(self, index, state, new_state, stats):
        """`(new_state, noise_scale)`: the averages (`state[index]`) moved by
        this step's estimates (a step whose parts hold less than one example,
        or whose estimates are not finite, leaves them), and the noise scale
        they give (`rules.noise_scale`; the zero start cancels in the ratio)."""
        old = state[index]
        terms = ops.stack([stats.pop("noise_sq"), stats.pop("noise_trace")])
        moved = rules.ema_update([old[:2]], [terms], self.decay)[0]
        valid = ops.greater(stats.pop("noise_valid"), 0.5)
        average = ops.where(valid, ops.concatenate([moved, old[2:] + 1.0]), old)
        new_state = list(new_state)
        new_state[index] = average
        # NaN until a step has measured (AdaptiveBatchSize then keeps the batch).
        measured = rules.noise_scale(average[0], average[1])
        return new_state, ops.where(ops.greater(average[2], 0), measured, float("nan"))
