"""Tests of keras_sam._validation, the package's argument checks."""

import json
import re

import numpy as np
import pytest

from keras_sam import _validation
from keras_sam._validation import integer
from keras_sam._validation import one_of
from keras_sam._validation import real

REALS = [
    3,
    0.25,
    np.float16(0.25),
    np.float32(0.25),
    np.float64(0.25),
    np.int8(3),
    np.int32(3),
    np.int64(3),
    np.uint16(3),
    np.array(0.25, "float32"),
    np.array(3),
]
INTEGERS = [
    3,
    np.int8(3),
    np.int32(3),
    np.int64(3),
    np.uint64(3),
    np.array(3),
    np.array(3, "int32"),
]
NOT_NUMBERS = [
    True,
    False,
    np.bool_(True),
    np.array(True),
    "0.25",
    b"1",
    [0.25],
    np.array([0.25]),
    1 + 0j,
    object(),
]


def value_id(value):
    """The test id of a parametrized value: its repr without memory addresses,
    so every pytest-xdist worker collects the same ids."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


@pytest.mark.parametrize("value", REALS, ids=value_id)
def test_real_accepts_real_scalars_as_python_floats(value):
    out = real("rho", value)
    assert type(out) is float
    assert out == float(np.asarray(value))
    json.dumps(out)


@pytest.mark.parametrize("value", INTEGERS, ids=value_id)
def test_integer_accepts_integer_scalars_as_python_ints(value):
    out = integer("epochs", value)
    assert type(out) is int and out == 3


@pytest.mark.parametrize(
    "value",
    NOT_NUMBERS + [float("nan"), np.float32("nan"), float("inf"), -np.inf, 10**400],
    ids=value_id,
)
def test_real_rejects_non_numbers_and_non_finite(value):
    with pytest.raises(ValueError, match=r"^`rho` must be a finite float; received: "):
        real("rho", value)


@pytest.mark.parametrize(
    "value",
    NOT_NUMBERS + [1.5, 2.0, np.float32(2.0), np.array(2.0), float("nan")],
    ids=value_id,
)
def test_integer_rejects_bools_floats_and_non_numbers(value):
    with pytest.raises(ValueError, match=r"^`epochs` must be an int"):
        integer("epochs", value)


def test_integer_says_integral_floats_are_rejected():
    with pytest.raises(ValueError, match=re.escape("even integral ones like 2.0")):
        integer("epochs", 2.0, low=1)
    with pytest.raises(ValueError) as info:
        integer("epochs", "2", low=1)
    assert "integral" not in str(info.value)


def test_message_names_argument_range_value_and_type():
    with pytest.raises(ValueError) as info:
        real("rho", -0.1, low=0)
    assert str(info.value) == "`rho` must be a finite float >= 0; received: -0.1 (float)."
    with pytest.raises(ValueError) as info:
        integer("num_batch_splits", np.int64(0), low=1, allow_none=True)
    assert str(info.value) == (
        f"`num_batch_splits` must be None or an int >= 1; received: {np.int64(0)!r} (int64)."
    )


@pytest.mark.parametrize(
    "kwargs,good,bad,text",
    [
        (dict(low=0), [0, 1e9], [-1e-9], ">= 0"),
        (dict(low=0, low_inclusive=False), [1e-9], [0, -1], "> 0"),
        (dict(high=1), [1, -5], [1.5], "<= 1"),
        (dict(high=1, high_inclusive=False), [0.999], [1], "< 1"),
        (dict(low=0, high=1), [0, 1], [-0.1, 1.1], "in [0, 1]"),
        (dict(low=0, high=10, high_inclusive=False), [0, 9.5], [10, -1], "in [0, 10)"),
        (
            dict(low=0, high=1, low_inclusive=False, high_inclusive=False),
            [0.5],
            [0, 1],
            "in (0, 1)",
        ),
    ],
)
def test_real_bounds(kwargs, good, bad, text):
    for value in good:
        assert real("x", value, **kwargs) == value
        assert real("x", np.float64(value), **kwargs) == value
    for value in bad:
        with pytest.raises(ValueError, match=re.escape(f"`x` must be a finite float {text};")):
            real("x", value, **kwargs)
        with pytest.raises(ValueError, match=re.escape(f"`x` must be a finite float {text};")):
            real("x", np.float32(value), **kwargs)


def test_integer_bounds():
    assert integer("n", 1, low=1, high=3) == 1
    assert integer("n", np.int64(3), low=1, high=3) == 3
    for value in (0, 4, np.int32(4)):
        with pytest.raises(ValueError, match=re.escape("`n` must be an int in [1, 3];")):
            integer("n", value, low=1, high=3)
    with pytest.raises(ValueError, match="`n` must be an int >= 1;"):
        integer("n", -2, low=1)


def test_allow_none():
    assert real("x", None, allow_none=True) is None
    assert integer("n", None, allow_none=True) is None
    with pytest.raises(ValueError, match="`x` must be a finite float;"):
        real("x", None)
    with pytest.raises(ValueError, match="`n` must be an int >= 1; received: None"):
        integer("n", None, low=1)
    with pytest.raises(ValueError, match="`n` must be None or an int >= 1;"):
        integer("n", 0, low=1, allow_none=True)


def test_one_of():
    allowed = ("worst_case_sharpness", "full_gradient_norm")
    out = one_of("measures", np.str_("full_gradient_norm"), allowed)
    assert out == "full_gradient_norm" and type(out) is str
    assert one_of("flag", None, (None, True, False)) is None
    assert one_of("flag", np.bool_(False), (None, True, False)) is False
    for value in (1, 0, 1.0, "True", "flatness", np.array([True])):
        with pytest.raises(ValueError, match=r"^`flag` must be one of \(None, True, False\); "):
            one_of("flag", value, (None, True, False))
    assert one_of("mode", np.int64(2), (1, 2)) == 2


def test_error_phrasing():
    e = _validation.error("schedule", "a dict", 1.5, where=" key")
    assert isinstance(e, ValueError)
    assert str(e) == "`schedule` must be a dict; received key: 1.5 (float)."
