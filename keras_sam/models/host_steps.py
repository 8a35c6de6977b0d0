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

SAM = "sam"
BETWEEN = "between"
PLAIN = "plain"
IN_STEP = None


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
        model: the wrapper (a `keras_sam.models.engine.StepEngine`).
        build: `build(kind)` -> a new Keras training function for `kind`
            (each traces when it is first called).
        kinds: the kinds to build, every kind a call may take.
    """

    def __init__(self, model, build, kinds):
        self.model = model
        self.functions = {}
        for kind in sorted(kinds, key=str):
            self.functions[kind] = build(kind)

    def __call__(self, *args):
        clock = self.model._host_steps
        running = clock.running
        if running:
            step, epoch = clock.step, clock.epoch
        else:  # train_on_batch: no fit running
            step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
            epoch = None
        per_call = self.model.steps_per_execution
        kind = self.model._host_step_kind(step, epoch, per_call)
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
