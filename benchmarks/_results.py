"""Writing a benchmark's result file: whole or not at all (a failed or
interrupted run never leaves a half-written file over good results)."""

import json
import os


def write_json(path, result, indent=2):
    """`result` to `path` as JSON, replacing it only once written whole."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=indent)
    os.replace(tmp, path)
