"""Where things are, for the tests in every folder of tests/."""

import os

SUPPORT = os.path.dirname(os.path.abspath(__file__))
"""tests/support: the helpers, the scripts tests run in subprocesses, data."""
TESTS = os.path.dirname(SUPPORT)
ROOT = os.path.dirname(TESTS)
"""The repository root."""
DATA = os.path.join(SUPPORT, "data")
"""Files saved by earlier versions of keras_sam, and their data."""
