"""Checks that every requirement of an installed distribution is met by what
Python imports here (`python .ci/check_requirements.py keras`): the oldest-Keras
leg installs Keras alone (`--no-deps`) and relies on the newest Keras's
dependencies, so a dependency that Keras 3.12 needs and the environment lacks
fails here, with its name, not inside the test suite."""

import importlib.metadata
import sys

from packaging.requirements import Requirement

name = sys.argv[1]
dist = importlib.metadata.distribution(name)
missing = []
for text in dist.requires or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        version = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        missing.append(f"{req} (not installed)")
        continue
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        missing.append(f"{req} (found {version})")
if missing:
    sys.exit(f"{name} {dist.version} needs: " + "; ".join(missing))
print(f"{name} {dist.version} from {dist.locate_file('')}: requirements met")
