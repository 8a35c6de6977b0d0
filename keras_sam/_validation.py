"""Argument validation shared by the whole package.

Every check raises a `ValueError` (also for a value of the wrong type) with one
phrasing:

    `rho` must be a finite float >= 0; received: -0.1 (float).

naming the argument, what it allows and what it received. Numbers are returned
as plain Python `int` / `float`, so that NumPy scalars passed by the user never
reach a `get_config()` (which must stay JSON-serializable).
"""

import math
import numbers

import numpy as np


def _scalar(value):
    """A 0-d NumPy array as its NumPy scalar; anything else unchanged."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value[()]
    return value


def as_int(value):
    """`value` as a Python int if it is an integer scalar, else None.

    Args:
        value: anything.

    Returns:
        `int(value)` for a Python int, a NumPy integer scalar or a 0-d
        integer array; None for anything else, bools and floats included
        (even integral ones such as `2.0`).
    """
    value = _scalar(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def as_float(value):
    """`value` as a finite Python float if it is a real scalar, else None.

    Args:
        value: anything.

    Returns:
        `float(value)` for a finite int, float, NumPy integer or floating
        scalar, or 0-d array of those; None for anything else (bools,
        strings, nan, inf).
    """
    value = _scalar(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    try:
        value = float(value)
    except (OverflowError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def error(name, expected, value, where=""):
    """The package's `ValueError` for a bad argument.

    Args:
        name: the argument's name, shown in backticks.
        expected: what it allows, completing "`name` must be ...".
        value: the value received (or the offending part of it).
        where: optional text after "received", e.g. `" at epoch 3"`.

    Returns:
        A `ValueError` with the message
        "`name` must be expected; received<where>: value (type)." (to raise).
    """
    return ValueError(
        f"`{name}` must be {expected}; received{where}: {value!r} ({type(value).__name__})."
    )


def _bounds(low, high, low_inclusive, high_inclusive):
    if low is not None and high is not None:
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        return f" in {left}{low}, {high}{right}"
    if low is not None:
        return f" {'>=' if low_inclusive else '>'} {low}"
    if high is not None:
        return f" {'<=' if high_inclusive else '<'} {high}"
    return ""


def _in_bounds(x, low, high, low_inclusive, high_inclusive):
    if low is not None and (x < low if low_inclusive else x <= low):
        return False
    if high is not None and (x > high if high_inclusive else x >= high):
        return False
    return True


def real(
    name,
    value,
    *,
    low=None,
    high=None,
    low_inclusive=True,
    high_inclusive=True,
    allow_none=False,
):
    """Checks a real-valued argument.

    Args:
        name: the argument's name, for the error message.
        value: an int, float, NumPy integer or floating scalar, or 0-d array
            of those. Bools, strings, nan and inf are rejected.
        low: optional lower bound.
        high: optional upper bound.
        low_inclusive: whether `value == low` is allowed. Defaults to True.
        high_inclusive: whether `value == high` is allowed. Defaults to True.
        allow_none: whether None is allowed (and returned). Defaults to False.

    Returns:
        The value as a Python float, or None.

    Raises:
        ValueError: e.g. "`rho` must be a finite float >= 0; received: -0.1
            (float)."
    """
    if value is None and allow_none:
        return None
    x = as_float(value)
    if x is None or not _in_bounds(x, low, high, low_inclusive, high_inclusive):
        expected = "a finite float" + _bounds(low, high, low_inclusive, high_inclusive)
        raise error(name, ("None or " if allow_none else "") + expected, value)
    return x


def integer(name, value, *, low=None, high=None, allow_none=False):
    """Checks an integer argument.

    Args:
        name: the argument's name, for the error message.
        value: a Python int, NumPy integer scalar or 0-d integer array. Bools
            and floats are rejected, integral floats such as `2.0` too.
        low: optional inclusive lower bound.
        high: optional inclusive upper bound.
        allow_none: whether None is allowed (and returned). Defaults to False.

    Returns:
        The value as a Python int, or None.

    Raises:
        ValueError: e.g. "`epochs` must be an int >= 1; received: 0 (int)."
    """
    if value is None and allow_none:
        return None
    n = as_int(value)
    if n is None or not _in_bounds(n, low, high, True, True):
        expected = "an int" + _bounds(low, high, True, True)
        if n is None and as_float(value) is not None:
            expected += " (floats are rejected, even integral ones like 2.0)"
        raise error(name, ("None or " if allow_none else "") + expected, value)
    return n


def one_of(name, value, allowed):
    """Checks that an argument is one of a few allowed values.

    None and bools match only themselves (`1` is not `True`; a NumPy bool
    is a bool); other values match by equality.

    Args:
        name: the argument's name, for the error message.
        value: the value to check.
        allowed: a sequence of the allowed values.

    Returns:
        The matching entry of `allowed` (so `np.str_("a")` comes back as
        `"a"`).

    Raises:
        ValueError: e.g. "`mode` must be one of ('a', 'b'); received: 'c'
            (str)."
    """
    for option in allowed:
        if _matches(value, option):
            return option
    raise error(name, f"one of {tuple(allowed)!r}", value)


def _matches(value, option):
    if isinstance(value, np.bool_):
        value = bool(value)
    if any(v is None or isinstance(v, bool) for v in (value, option)):
        return value is option
    try:
        return bool(value == option)
    except Exception:  # e.g. an array compared elementwise
        return False
