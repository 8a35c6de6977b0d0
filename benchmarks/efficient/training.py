"""One run: `benchmarks.paper`'s training with the cost timed per phase."""

import statistics
import time

import keras

from benchmarks.efficient.cli import run_config
from benchmarks.efficient.methods import ONE_GRADIENT
from benchmarks.efficient.methods import optimizer_of
from benchmarks.efficient.methods import wrappers
from benchmarks.paper import run as paper_run

# ---------------------------------------------------------------------------
# One run.


BLOCK_STEPS = 50
"""Steps per timing block: a multiple of every `sam_every` here, so each block
holds whole periods of the periodic schedules."""


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training step and of every epoch's steps."""

    def __init__(self):
        super().__init__()
        self.epochs = []
        self.spans = []  # per epoch: first step's begin to last step's end
        self._start = self._epoch_start = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append([])
        self._epoch_start = None

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()
        if self._epoch_start is None:
            self._epoch_start = self._start

    def on_train_batch_end(self, batch, logs=None):
        end = time.perf_counter()
        self.epochs[-1].append(end - self._start)
        span = end - self._epoch_start
        if len(self.spans) < len(self.epochs):
            self.spans.append(span)
        else:
            self.spans[-1] = span

    def ms_per_step(self):
        """Step time (ms) without the first epoch (it traces the step): the
        median over blocks of `BLOCK_STEPS` consecutive steps of their mean
        (robust to bursts of load from other processes); the plain mean when
        there are fewer steps than one block."""
        steps = [t for epoch in self.epochs[1:] or self.epochs for t in epoch]
        blocks = [
            steps[i : i + BLOCK_STEPS] for i in range(0, len(steps) - BLOCK_STEPS + 1, BLOCK_STEPS)
        ]
        if not blocks:
            return 1e3 * statistics.fmean(steps)
        return 1e3 * statistics.median(statistics.fmean(b) for b in blocks)

    def epoch_ms_per_step(self, phases=None):
        """Time per step as a user timing epochs sees it (ms): each epoch's
        wall time from its first step's start to its last step's end (the
        Python and input pipeline between steps included) over its steps.

        Epochs of one phase (`phases[e]`: the batch size and whether the
        epoch takes SAM steps) cost alike; the first epoch of a phase traces
        its step, so each phase's cost is the median over its epochs after
        the first (the first alone when it is the only one), and the run's
        cost is the phases' costs weighted by their steps. One phase (a
        constant batch, the same steps throughout): the median over the
        epochs after the first."""
        pairs = list(zip(self.spans, self.epochs))
        phases = list(phases or [None] * len(pairs))[: len(pairs)]
        groups = {}
        for phase, (span, steps) in zip(phases, pairs):
            groups.setdefault(phase, []).append((span, len(steps)))
        total_steps = sum(n for group in groups.values() for _, n in group)
        total = 0.0
        for group in groups.values():
            timed = group[1:] or group
            ms = statistics.median(span / n for span, n in timed)
            total += ms * sum(n for _, n in group)
        return 1e3 * total / total_steps


def train_one(args, data, method, seed):
    """One run of `args.model` (see `for_model`); its record."""
    timer = StepTimer()
    record = paper_run.train_one(
        args,
        data,
        method,
        args.schedule,
        seed,
        wrappers=wrappers(args),
        callbacks=[timer],
        optimizer=optimizer_of(method),
    )
    record["config"] = run_config(args)
    epochs = record["epochs"]
    phases = [(e.get("batch_size"), e.get("sam_fraction", 1.0) > 0) for e in epochs]
    record["final"]["ms_per_step"] = timer.ms_per_step()
    record["final"]["epoch_ms_per_step"] = timer.epoch_ms_per_step(phases)
    record["step_ms_per_epoch"] = [1e3 * statistics.fmean(e) for e in timer.epochs if e]
    # The share of SAM steps: each epoch's share weighted by its steps.
    if any("sam_fraction" in e for e in epochs):
        steps = [len(t) for t in timer.epochs][: len(epochs)]
        shared = sum(e.get("sam_fraction", 0.0) * n for e, n in zip(epochs, steps))
        record["final"]["sam_fraction"] = shared / sum(steps)
    else:
        record["final"]["sam_fraction"] = 0.0 if method in ONE_GRADIENT else 1.0
    return record
