"""Files that several test modules read, made once per test session even when
pytest-xdist runs those modules on different workers.

The first worker that asks for a file makes it while holding a lock file in
the session's shared temporary folder; a worker that asks meanwhile waits and
then reads the same file. Used for the backend checks (tests/support/backend_runs.py)
and the noise-scale runs (tests/conftest.py).
"""

import contextlib
import os


def shared_folder(tmp_path_factory, name):
    """The folder `name` that every pytest-xdist worker of this session sees
    (under the parent of the workers' own temporary folders), or under this
    process's one without xdist."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / name
    folder.mkdir(exist_ok=True)
    return folder


@contextlib.contextmanager
def _locked(path, wait=True):
    """Holds an exclusive lock on `path` + ".lock"; yields False instead when
    `wait` is False and another process holds it. Without fcntl (not POSIX)
    there is no lock and each worker makes its own file."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    with open(str(path) + ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _make(path, make):
    """`make(part)` writes the file `part`, which then becomes `path` at once,
    so a reader never sees half a file and a failed run leaves none."""
    if not path.exists():
        part = path.with_name("part_" + path.name)  # same suffix: np.savez adds none
        make(part)
        os.replace(part, path)


def made_once(path, make):
    """`path` (a pathlib.Path), made by `make(part)` the first time any worker
    of the session asks."""
    with _locked(path):
        _make(path, make)
    return path


def made_once_each(jobs):
    """`made_once` for each `(path, make)` in `jobs`, making first the files no
    other worker is making, then waiting for those."""
    waiting = []
    for path, make in jobs:
        with _locked(path, wait=False) as mine:
            if mine:
                _make(path, make)
            else:
                waiting.append((path, make))
    for path, make in waiting:
        made_once(path, make)
