"""Gradient passes: one stateless forward and backward pass of the loss at
given weights and state, optionally as the batch's two halves (the noise
scale), and the cut of a batch into sub-batches (m-sharpness).

A pass never writes a variable: it takes values (weights, non-trainable
state, metric state) and returns new values, so a method can evaluate the
loss at `w` and at `w + e` from the SAME starting state (BatchNorm
statistics, dropout seeds) and keep what it chooses.
"""

import keras
from keras import ops
from keras import tree

from keras_sam import _validation
from keras_sam import backend as sam_backend
from keras_sam import rules
from keras_sam.models._batches import _batch_size
from keras_sam.models._batches import _first_batch_size
from keras_sam.models._batches import _static_batch_size


class GradientPasses:
    """The gradient evaluations of one model's training steps.

    Args:
        model: the wrapper (a `keras.Model` whose `call` runs the wrapped
            model); its variables, compiled loss and optimizer are read.
    """

    def __init__(self, model):
        self.model = model

    def loss_and_state(self, weights, state, metrics_state, x, y, sample_weight, extra_loss=None):
        """One stateless forward pass in training mode at `weights`, `state`.

        `extra_loss(y_pred)`, when given, is a batch-mean term added to the
        compiled loss (MESA's distillation term).

        Returns `(scaled_loss, (loss, y_pred, new_state, new_metrics_state))`.
        """
        from keras_sam._keras_compat import fit_loop

        model = self.model
        mapping = list(zip(model.trainable_variables, weights))
        mapping += list(zip(model.non_trainable_variables, state))
        mapping += list(zip(model.metrics_variables, metrics_state))
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            y_pred = model(x, training=True)
            loss = fit_loop.compute_loss(model, x, y, y_pred, sample_weight)
            if extra_loss is not None:
                loss = loss + sam_backend.keras_loss_share(extra_loss(y_pred))
        loss = sam_backend.replica_loss(loss)
        new_state = [scope.get_current_value(v) for v in model.non_trainable_variables]
        # compute_loss updates the per-output loss metrics of a loss dict.
        new_metrics = [scope.get_current_value(v) for v in model.metrics_variables]
        scaled = model.optimizer.scale_loss(loss) if model.optimizer else loss
        return scaled, (loss, y_pred, new_state, new_metrics)

    def gradient(self, weights, state, metrics_state, x, y, sample_weight, extra_loss=None):
        """`((loss, y_pred, new_state, new_metrics), grads)` of one pass."""
        grad_fn = sam_backend.value_and_grad(self.loss_and_state)
        (_, outputs), grads = grad_fn(
            weights, state, metrics_state, x, y, sample_weight, extra_loss=extra_loss
        )
        return outputs, list(grads)

    def gradient_of_halves(self, weights, state, metrics_state, x, y, sample_weight):
        """The gradient of the batch evaluated as its two halves, the same
        work: `((loss, y_pred, new_state, new_metrics), grads, (squared,
        inverse))`.

        The gradient and loss are the halves' size-weighted means (what a
        mean-reduced loss of the whole batch gives), float state (BatchNorm
        statistics) the mean of their updates, other state (seed counters)
        and the metrics are carried from the first half to the second (so
        Dropout draws one mask per half). `squared` is the mean of the
        halves' `||g||^2`, `inverse` the mean of 1 / their sizes (what the
        noise scale compares).
        """
        size = _batch_size(x)
        half = size // 2
        is_float = self.float_state()
        results, carried, metrics = [], list(state), list(metrics_state)
        for start, stop in ((0, half), (half, size)):

            def cut(t, start=start, stop=stop):
                return None if t is None else tree.map_structure(lambda a: a[start:stop], t)

            begin = [s if f else c for s, c, f in zip(state, carried, is_float)]
            (loss, y_pred, carried, metrics), grads = self.gradient(
                weights, begin, metrics, cut(x), cut(y), cut(sample_weight)
            )
            results.append((ops.cast(stop - start, "float32"), loss, y_pred, carried, grads))
        (b1, l1, p1, n1, g1), (b2, l2, p2, n2, g2) = results
        s1, s2 = b1 / (b1 + b2), b2 / (b1 + b2)
        grads = [ops.cast(s1, a.dtype) * a + ops.cast(s2, b.dtype) * b for a, b in zip(g1, g2)]
        loss = ops.cast(s1, l1.dtype) * l1 + ops.cast(s2, l2.dtype) * l2
        y_pred = tree.map_structure(lambda a, b: ops.concatenate([a, b], axis=0), p1, p2)
        new_state = [(a + b) / 2 if f else b for a, b, f in zip(n1, n2, is_float)]
        squared = (rules.dot(g1, g1) + rules.dot(g2, g2)) / 2
        # Parts of b1 and b2 examples: E||g_part||^2 = |G|^2 + tr(Sigma) / b,
        # averaged, so the small size is their harmonic mean.
        inverse = (1.0 / ops.maximum(b1, 1.0) + 1.0 / b2) / 2
        static = _static_batch_size(x)
        if static is None or static < 2:
            # A batch of one example (a last partial batch): its empty first
            # half would put NaN into BatchNorm statistics; the second half
            # is the whole batch then (the noise scale leaves the step out).
            two = ops.greater(half, 0)
            grads = [ops.where(two, g, b) for g, b in zip(grads, g2)]
            loss = ops.where(two, loss, l2)
            new_state = [
                ops.where(two, a, b) if f else a for a, b, f in zip(new_state, n2, is_float)
            ]
            squared = ops.where(two, squared, rules.dot(g2, g2))
        return (loss, y_pred, new_state, metrics), grads, (squared, inverse)

    def float_state(self):
        """Which non-trainable variables are floats (averaged over parts)."""
        return [keras.backend.is_float_dtype(v.dtype) for v in self.model.non_trainable_variables]


class SubBatches:
    """m-sharpness: each replica's batch cut into sub-batches, each with its
    own perturbation (`num_batch_splits` equal parts, or parts of
    `sub_batch_size` examples).

    Floating-point state (BatchNorm statistics) becomes the mean of the
    parts' updates (for BatchNorm: one update with the mean of the part
    statistics); other state (seed counters) and the metrics are carried
    from one part to the next; descent gradients and statistics are averaged.
    """

    def __init__(self, num_batch_splits=None, sub_batch_size=None):
        self.num_batch_splits = _validation.integer(
            "num_batch_splits", num_batch_splits, low=1, allow_none=True
        )
        self.sub_batch_size = _validation.integer(
            "sub_batch_size", sub_batch_size, low=1, allow_none=True
        )
        if self.num_batch_splits and self.sub_batch_size:
            raise ValueError("Pass at most one of `num_batch_splits` and `sub_batch_size`.")

    def __bool__(self):
        return bool(self.num_batch_splits or self.sub_batch_size)

    def count(self, batch_size):
        """Sub-batches of a per-replica batch of `batch_size` (checked).

        Raises:
            ValueError: if `num_batch_splits` / `sub_batch_size` does not
                divide `batch_size`.
        """
        if self.num_batch_splits:
            k, name = self.num_batch_splits, "num_batch_splits"
        elif self.sub_batch_size:
            k, name = self.sub_batch_size, "sub_batch_size"
        else:
            return 1
        if batch_size % k:
            raise ValueError(
                f"`{name}`={k} does not divide the per-replica batch size "
                f"{batch_size}. Use a batch size that is a multiple of {k} "
                "(and drop the last partial batch)."
            )
        return k if self.num_batch_splits else batch_size // k

    def check_first_batch(self, fit_arguments, replicas):
        """Checks the split of the first batch `fit` will draw (from its bound
        arguments), before any step. Returns a replacement for `x` (a
        generator peeked at, see `_first_batch_size`) or None."""
        if not self:
            return None
        size, x = _first_batch_size(fit_arguments.get("x"), fit_arguments.get("batch_size"))
        if size is not None:
            self.count(size // replicas)
        return x

    def in_step(self, x, synced_replicas):
        """Sub-batches for the batch `x` inside the step: an int, or (on
        TensorFlow, batch size unknown at trace time) a scalar tensor."""
        if not self:
            return 1
        static = _static_batch_size(x)
        if static is not None:
            if self.num_batch_splits:
                return min(self.num_batch_splits, static)
            return -(-static // self.sub_batch_size)
        if synced_replicas:
            raise ValueError(
                "`sync_perturbation=True` with `num_batch_splits` / "
                "`sub_batch_size` under a tf.distribute strategy needs batch "
                "sizes known when the step is traced: batch the dataset with "
                "`drop_remainder=True`."
            )
        size = _batch_size(x)
        if self.num_batch_splits:  # a tensor too, so both run the same loop
            return ops.minimum(ops.cast(self.num_batch_splits, size.dtype), size)
        return (size + self.sub_batch_size - 1) // self.sub_batch_size

    def step(self, step, noise, is_float, synced, loss_scale, weights, state, *data):
        """`step(weights, state, metrics, x, y, sample_weight, noise)` (one
        replica's SAM step) on the whole batch or on each sub-batch, with the
        noise scale's terms (`noise`, a `NoiseScale`, or None) of the step's
        parts. `data`: `(metrics_state, x, y, sample_weight)`."""
        from keras_sam.models._noise import NoiseScale

        x = data[1]
        replicas = sam_backend.num_replicas()
        n = self.in_step(x, synced)
        if isinstance(n, int) and n == 1:
            out = step(weights, state, *data, "step" if noise else None)
            if noise:
                stats = out[3]
                parts = stats.pop("noise_parts") * replicas
                stats.update(NoiseScale.terms(stats, parts, x, loss_scale))
            return out
        zero = ops.zeros((), "float32")
        stats = dict(loss=zero, sharpness=zero, grad_norm=zero, rho=zero, sam_step=zero)
        if noise:
            stats.update(NoiseScale.zeros(weights))

        def part_step(*args):
            return step(*args, "part" if noise else None)

        out = self.run(part_step, n, is_float, weights, state, *data, stats)
        if noise:
            stats = out[3]
            stats.update(
                NoiseScale.terms(stats, NoiseScale.of_sub_batches(stats, n), x, loss_scale)
            )
        return out

    @staticmethod
    def run(step, n, is_float, weights, state, metrics_state, x, y, sample_weight, stats):
        """`step(weights, state, metrics, x, y, sample_weight)` on each of the
        `n` parts of the batch, combined. `stats`: the zeros of the summed
        statistics. Returns `(descent, new_state, new_metrics, stats, y_pred)`
        (`y_pred` of the last part)."""
        size = _batch_size(x)

        def part(t, i):
            return (
                None
                if t is None
                else tree.map_structure(lambda a: a[i * size // n : (i + 1) * size // n], t)
            )

        def body(i, carry):
            descent_sum, state_sum, carried, metrics, stats_sum = carry
            start = [s if f else c for s, c, f in zip(state, carried, is_float)]
            descent, new_state, metrics, stats, y_pred = step(
                weights, start, metrics, part(x, i), part(y, i), part(sample_weight, i)
            )
            carry = (
                [a + b for a, b in zip(descent_sum, descent)],
                [a + b if f else a for a, b, f in zip(state_sum, new_state, is_float)],
                new_state,
                metrics,
                tree.map_structure(lambda a, b: a + b, stats_sum, stats),
            )
            return carry, y_pred

        carry = (
            [ops.zeros_like(w) for w in weights],
            [ops.zeros_like(s) if f else s for s, f in zip(state, is_float)],
            list(state),
            list(metrics_state),
            stats,
        )
        carry, y_pred = sam_backend.loop_over(n, body, carry)
        descent_sum, state_sum, carried, metrics, stats_sum = carry

        def mean(t):
            return t / ops.cast(n, t.dtype)

        new_state = [mean(s) if f else c for s, c, f in zip(state_sum, carried, is_float)]
        stats = tree.map_structure(mean, stats_sum)
        return [mean(d) for d in descent_sum], new_state, metrics, stats, y_pred
