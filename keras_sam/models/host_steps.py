"""Which kind of step runs next, chosen on the host before the step runs.

A schedule that does not look at the data (`sam_every`, LookSAM's refresh
steps, late-phase SAM's `sam_start_epoch`) is known before each step. The
wrapper then builds one compiled training function per kind of step, through
Keras' public `make_train_function`, and `HostChosenSteps` calls the right one:

- `SAM`: the SAM step (two gradient evaluations);
- `BETWEEN`: the wrapper's step between SAM steps (one evaluation: the clean
  gradient; LookSAM's reuse of its stored direction);
- `PLAIN`: a step before `sam_start_epoch`: Keras' own `train_step`;
- `IN_STEP`: the choice made inside the compiled step from
  `optimizer.iterations` (AE-SAM, which decides from the data, and calls that
  run several steps, `steps_per_execution > 1`, whose steps differ in kind).

No compiled function holds a conditional on whether to take the second
gradient unless its kind is `IN_STEP`: a plain step costs what a plain Keras
step costs, in time and memory.

The host counts steps itself (`StepClock`): it reads `optimizer.iterations`
once when `fit` starts, after every callback's `on_train_begin` (so
`BackupAndRestore`, a second `fit` and `initial_epoch` continue the schedule
exactly), and adds one per call that ran; it never reads the device during
training. Outside `fit` (`train_on_batch`) it reads `optimizer.iterations`
before each call. Under a `LossScaleOptimizer` a skipped step (non-finite
gradients) leaves `optimizer.iterations` where it was, so there `sam_every`
keeps its in-step choice (`sam_start_epoch`, by the epoch, stays on the
host).
"""

import keras
from keras import ops

from keras_sam import _validation

SAM = "sam"
BETWEEN = "between"
PLAIN = "plain"
IN_STEP = None


class StepChooser:
    """Which kind of step runs next: SAM every `sam_every` steps from epoch
    `sam_start_epoch` on, or a method's own decision from the data.

    Args:
        sam_every: a SAM step when `optimizer.iterations % sam_every == 0`.
        sam_start_epoch: plain steps in the epochs before this one.
        decides_from_data: the method decides inside the step (AE-SAM).
    """

    def __init__(self, sam_every=1, sam_start_epoch=0, decides_from_data=False):
        self.sam_every = _validation.integer("sam_every", sam_every, low=1)
        self.sam_start_epoch = _validation.integer("sam_start_epoch", sam_start_epoch, low=0)
        self.decides_from_data = decides_from_data
        self.clock = StepClock()

    @property
    def kind(self):
        """The kind of the step being traced or run."""
        return self.clock.kind

    def switches(self):
        """Whether some steps are plain (then `sam_fraction` is logged)."""
        return self.sam_every > 1 or self.sam_start_epoch > 0 or self.decides_from_data

    def on_host(self, optimizer):
        """Whether `fit` chooses each step's kind on the host."""
        return self.sam_start_epoch > 0 or self._every_on_host(optimizer)

    def _every_on_host(self, optimizer):
        """Whether the `sam_every` schedule is chosen on the host: not for a
        data-driven policy, and not under a LossScaleOptimizer, whose skipped
        steps (non-finite gradients) leave `optimizer.iterations` behind a
        count of the steps taken."""
        return (
            self.sam_every > 1
            and not self.decides_from_data
            and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        )

    def kind_at(self, step, epoch, per_call, optimizer):
        """The kind of the call that starts at step `step` (the optimizer's
        count) in epoch `epoch` (None outside `fit`) and runs up to
        `per_call` steps."""
        if epoch is not None and epoch < self.sam_start_epoch:
            return PLAIN
        if self.decides_from_data:
            return IN_STEP
        if self.sam_every == 1:
            return SAM
        if per_call > 1 or not self._every_on_host(optimizer):  # see _every_on_host
            return IN_STEP
        return SAM if step % self.sam_every == 0 else BETWEEN

    def in_step(self, optimizer):
        """Whether this step is a SAM step: a Python bool for a kind chosen
        on the host (the traced step then holds no conditional), else a
        boolean scalar tensor from `optimizer.iterations`."""
        if self.kind is not IN_STEP:
            return self.kind == SAM
        if self.sam_every == 1:
            return True
        iteration = ops.convert_to_tensor(optimizer.iterations)
        return ops.equal(ops.mod(iteration, self.sam_every), 0)

    def train_step_of_kind(self, train_step, kind):
        """`train_step` for one kind of step: it sets the kind, then runs the
        step (tracing it for that kind)."""
        clock = self.clock

        def step(*args):
            clock.kind = kind
            return train_step(*args)

        return step

    def train_function(self, model, make_train_function):
        """A `HostChosenSteps` with one Keras training function per kind of
        step this fit can take; `make_train_function` is Keras' own (the
        model's `super().make_train_function`)."""

        def make_keras_function(train_step):
            chooser = model.train_function
            # Keras (TensorFlow, JAX) compiles the `train_step` it reads now:
            # give it this kind's, so each compiled function traces its own
            # kind whenever it traces (a new batch shape, say).
            object.__setattr__(model, "train_step", train_step)
            try:
                make_train_function(force=True)
            finally:
                object.__delattr__(model, "train_step")
            function, model.train_function = model.train_function, chooser
            return function

        # Every kind, built now: under a keras.distribution Keras reads the
        # variables' shardings when it builds a function, and during an epoch
        # the JAX trainer has purged the variables.
        per_call = model.steps_per_execution
        epochs = [None] + ([0] if self.sam_start_epoch > 0 else [])
        kinds = {self.kind_at(s, e, per_call, model.optimizer) for s in (0, 1) for e in epochs}
        return HostChosenSteps(model, self, make_keras_function, kinds)

    def no_sam_step(self, name, epochs):
        """The warning for a `fit(epochs=...)` that ends before
        `sam_start_epoch` (every step plain), or None. A warning, not an
        error: a later `fit(..., initial_epoch=...)` may continue into SAM."""
        if not (self.sam_start_epoch and isinstance(epochs, int)):
            return None
        if epochs > self.sam_start_epoch:
            return None
        return (
            f"{name}(sam_start_epoch={self.sam_start_epoch}) takes "
            f"its first SAM step in epoch {self.sam_start_epoch} (0-based), but this "
            f"`fit(epochs={epochs})` ends before it: every step of this fit is a plain "
            "step. Pass more `epochs` (a later `fit(..., initial_epoch=...)` continues "
            "into SAM) or a smaller `sam_start_epoch`."
        )


class StepClock(keras.callbacks.Callback):
    """The running `fit`'s epoch and step count, kept on the host.

    `kind` is the kind of the step being traced or run (one of the kinds
    above); the engine reads it when a training function is traced.
    """

    def __init__(self):
        super().__init__()
        self.step = None
        self.epoch = None
        self.running = False
        self.kind = IN_STEP

    def on_train_begin(self, logs=None):
        # After BackupAndRestore's on_train_begin (this callback is the last
        # one the wrapper's fit adds): the restored count.
        self.step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        self.epoch = 0
        self.running = True

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_end(self, logs=None):
        self.running = False

    def state(self):
        return self.step, self.epoch, self.running, self.kind

    def set_state(self, state):
        self.step, self.epoch, self.running, self.kind = state


class HostChosenSteps:
    """`model.train_function`: calls the compiled function of the next step's
    kind.

    Args:
        model: the wrapper, a `keras.Model`.
        chooser: its `StepChooser`.
        make_keras_function: `make_keras_function(train_step)` -> a new Keras
            training function around `train_step` (each traces when it is
            first called).
        kinds: the kinds to build, every kind a call may take.
    """

    def __init__(self, model, chooser, make_keras_function, kinds):
        self.model = model
        self.chooser = chooser
        self.functions = {}
        for kind in sorted(kinds, key=str):
            step = chooser.train_step_of_kind(model.train_step, kind)
            self.functions[kind] = make_keras_function(step)

    def __call__(self, *args):
        clock = self.chooser.clock
        running = clock.running
        if running:
            step, epoch = clock.step, clock.epoch
        else:  # train_on_batch: no fit running
            step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
            epoch = None
        per_call = self.model.steps_per_execution
        kind = self.chooser.kind_at(step, epoch, per_call, self.model.optimizer)
        function = self.functions[kind]
        clock.kind = kind  # PyTorch runs `train_step` eagerly: read on every call
        try:
            outputs = function(*args)
        finally:
            clock.kind = IN_STEP  # a `train_step` called by hand chooses inside
        if running and per_call == 1:  # a call that ran no step raised
            clock.step += 1
        return outputs

    def kinds_built(self):
        """The kinds of the functions built (for tests)."""
        return sorted(self.functions, key=str)
