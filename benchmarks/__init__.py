"""The benchmark scripts (run as `python benchmarks/<script>.py` or
`python -m benchmarks.<module>`).

Importing the package imports TensorFlow without its C++ start-up lines on
stderr (`examples/_quiet.py`); a script run by path calls
`benchmarks.import_tensorflow_quietly()` before it imports Keras.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "examples"))
from _quiet import import_tensorflow_quietly  # noqa: E402,F401

import_tensorflow_quietly()
