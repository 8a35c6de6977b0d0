"""A loop over sub-batches for steps whose count is a Python int."""

from keras import ops
from keras import tree


def python_loop(n, body, carry):
    """Runs `carry, out = body(i, carry)` for `i` in `range(n)`.

    Returns:
        `(carry, outs)`: the last carry and the outputs of every iteration,
        each leaf concatenated along axis 0.
    """
    outs = []
    for i in range(n):
        carry, out = body(i, carry)
        outs.append(out)
    return carry, tree.map_structure(lambda *t: ops.concatenate(t, axis=0), *outs)
